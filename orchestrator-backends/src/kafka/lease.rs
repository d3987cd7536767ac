//! [`KafkaLease`]: a lease held through a consumer group's partition assignment, for the
//! processes that share a Kafka store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrator_core::{Error, Lease, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::stream_consumer::StreamConsumer;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Mutex, oneshot, watch};
use tokio::task::JoinHandle;

use super::client::{TopicKind, Topics, failure, kafka_error};
use super::config::KafkaConfig;
use super::consumer::close_detached;
use super::live::LiveConsumer;
use super::names;

/// A [`Lease`] kept by Kafka's own group coordination: each candidate is a member of the
/// consumer group `<prefix>__orchestrator.lease.<name>`, subscribed to the one-partition
/// topic of the same name (created like the backend's other topics; nothing is ever written
/// to it), and the member the group hands partition 0 holds the lease.
///
/// - **Taking it**: the first [`try_acquire`](Lease::try_acquire) joins the group and waits
///   (at most [`ttl`](Lease::ttl)) for the group's answer; later calls ask the member's
///   current assignment. The assignor is `cooperative-sticky`, so a candidate joining never
///   moves the partition away from its holder.
/// - **Renewing it**: a holder's `try_acquire` commits an offset of partition 0 in the
///   group's current generation. Apache Kafka's coordinator accepts that only from a live
///   member of the current generation, so a holder that was expelled (its session timed out
///   while it was paused or cut off) learns it at its next renewal instead of trusting its
///   own view (librdkafka also revokes the partition itself when its session times out); a
///   renewal that gets no answer is an error, and
///   [`renew_until_lost`](orchestrator_core::lease::renew_until_lost) gives the lease up
///   after a whole `ttl` of them, as the coordinator does.
/// - **Losing it**: when the partition is revoked (a rebalance), when the member's session
///   times out (no heartbeat for [`KafkaConfig::with_lease_session_timeout`], 6 s by
///   default: the process died or hangs), when the process stops polling for three session
///   timeouts, or when the consumer closes.
/// - **Giving it up**: [`release`](Lease::release) — and dropping the lease — closes the
///   consumer, which leaves the group: a standby is handed the partition in the rebalance
///   that follows, without waiting for a session to time out.
///
/// - **Epochs**: a group whose coordinator never hands the partition on — tansu 0.6.0 keeps
///   a dead leader in its group forever (see the [module docs](super) on tansu) — must not
///   stop the relay for good. Each renewal records its time (the commit's metadata, ms since
///   the epoch). A standby that has been a member for three session timeouts
///   and sees no renewal in its group for as long gives the group up: it moves to the next
///   epoch's group, `<group>.epoch<n>` (epoch 0 is `<group>` itself), where the first member
///   takes the lease. Every candidate looks for a renewal in the next epoch's group at each
///   try, so the others follow, and a holder that was only paused learns at its next renewal
///   that it lost the lease. On Apache Kafka this never happens while a holder lives: the
///   coordinator expels a dead member within a session timeout and the new holder renews.
///
/// The consumer is polled by a task of its own (rebalances are served there); it is closed
/// on a thread of its own, as every consumer of this backend. From
/// [`KafkaEventStore::lease`](orchestrator_core::EventStore::lease).
pub struct KafkaLease {
    config: KafkaConfig,
    topics: Arc<Topics>,
    /// The lease's topic and consumer group, or why the name cannot be one.
    topic: Result<String, String>,
    name: String,
    /// This candidate's epoch and membership.
    candidate: Mutex<Candidate>,
}

/// Which group a candidate joins, and its membership there.
#[derive(Default)]
struct Candidate {
    /// The lease's current epoch (see [`KafkaLease`], "Epochs"), once looked up.
    epoch: Option<u64>,
    /// The membership in that epoch's group, while joined.
    member: Option<Member>,
}

impl std::fmt::Debug for KafkaLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLease")
            .field("topic", &self.topic)
            .field("session_timeout", &self.config.lease_session_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaLease {
    pub(crate) fn new(config: KafkaConfig, topics: Arc<Topics>, name: &str) -> Self {
        Self {
            topic: names::lease_topic(&config.prefix, name).map_err(|e| e.to_string()),
            name: name.to_owned(),
            config,
            topics,
            candidate: Mutex::new(Candidate::default()),
        }
    }

    /// The lease's topic, which is also its consumer group's id.
    fn topic(&self) -> Result<&str> {
        self.topic
            .as_deref()
            .map_err(|reason| Error::invalid("lease name", reason.clone()))
    }

    /// Joins the lease's group: creates the topic if needed, then the consumer and the task
    /// that polls it.
    async fn join(&self, epoch: u64) -> Result<Member> {
        let topic = self.topic()?.to_owned();
        self.topics.ensure(&[&topic], TopicKind::Log).await?;
        let group = group(&topic, epoch);
        let next: BaseConsumer = self
            .config
            .lease_consumer(&self::group(&topic, epoch + 1))
            .create()
            .map_err(kafka_error)?;
        let (state, state_rx) = watch::channel(Membership::Joining);
        let context = LeaseContext {
            topic: topic.clone(),
            state,
        };
        let consumer: LeaseConsumer = self
            .config
            .lease_consumer(&group)
            .create_with_context(context)
            .map_err(kafka_error)?;
        consumer.subscribe(&[&topic]).map_err(kafka_error)?;
        let (closed_tx, closed) = oneshot::channel();
        let handle = Arc::new(Handle {
            consumer: Some(consumer),
            _live: LiveConsumer::new(&self.config.prefix),
            closed: Some(closed_tx),
        });
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(poll(Arc::clone(&handle), stop_rx, topic));
        Ok(Member {
            _stop: stop,
            handle,
            state: state_rx,
            task,
            closed,
            renewal: None,
            epoch,
            joined: Instant::now(),
            next: Arc::new(next),
        })
    }

    /// The epoch to join first: the last one whose group has a renewal (0 if none has).
    async fn current_epoch(&self) -> Result<u64> {
        let topic = self.topic()?.to_owned();
        let mut current = 0;
        for epoch in 0..MAX_EPOCHS {
            let probe: BaseConsumer = self
                .config
                .lease_consumer(&group(&topic, epoch))
                .create()
                .map_err(kafka_error)?;
            if last_renewal(Arc::new(probe), &topic, self.ttl())
                .await?
                .is_none()
            {
                break;
            }
            current = epoch;
        }
        Ok(current)
    }

    /// Asks the coordinator whether this member still holds the lease: commits offset 0 of
    /// the lease's partition in the member's current generation.
    async fn confirm(&self, member: &mut Member) -> Result<bool> {
        let topic = self.topic()?.to_owned();
        let wait = self.ttl() / 3;
        let renewal = match member.renewal.take() {
            // An earlier renewal still waits for its answer: whatever it says is old news.
            Some(pending) if !pending.is_finished() => {
                member.renewal = Some(pending);
                return Err(Error::Timeout {
                    operation: format!(
                        "renewing the Kafka lease `{topic}` (an earlier renewal has no answer yet)"
                    ),
                    after: wait,
                });
            }
            _ => {
                let handle = Arc::clone(&member.handle);
                let topic = topic.clone();
                tokio::task::spawn_blocking(move || {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&topic, 0, Offset::Offset(0))?;
                    if let Some(mut renewal) = tpl.find_partition(&topic, 0) {
                        renewal.set_metadata(now_ms().to_string());
                    }
                    handle.consumer()?.commit(&tpl, CommitMode::Sync)
                })
            }
        };
        let mut renewal = renewal;
        let answer = match tokio::time::timeout(wait, &mut renewal).await {
            Ok(answer) => answer,
            Err(_) => {
                member.renewal = Some(renewal);
                return Err(Error::Timeout {
                    operation: format!("renewing the Kafka lease `{topic}`"),
                    after: wait,
                });
            }
        };
        match answer {
            Ok(Ok(())) => Ok(member.holds()),
            Ok(Err(error)) => match error.rdkafka_error_code() {
                // Not a member of the group's current generation any more: expelled (its
                // session timed out) or outdated by a rebalance it missed. librdkafka rejoins
                // on its own; until the group hands it the partition again, it holds nothing.
                Some(
                    RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::FencedInstanceId,
                ) => {
                    tracing::info!(lease = %topic, %error, "the Kafka lease was lost: the group coordinator refused the renewal");
                    member.lose();
                    Ok(false)
                }
                // A rebalance is under way: with the cooperative protocol a member keeps its
                // partitions until it is told to revoke them, which it has not been.
                Some(RDKafkaErrorCode::RebalanceInProgress) => Ok(member.holds()),
                _ => Err(kafka_error(error)),
            },
            Err(join) => Err(failure(
                true,
                format!("renewing the Kafka lease `{topic}` failed: {join}"),
            )),
        }
    }
}

#[async_trait]
impl Lease for KafkaLease {
    fn describe(&self) -> String {
        match &self.topic {
            Ok(topic) => format!("Kafka consumer group `{topic}` (partition 0 of topic `{topic}`)"),
            Err(_) => format!("Kafka lease `{}` (invalid name)", self.name),
        }
    }

    /// The lease consumers' session timeout: a holder that dies without leaving the group
    /// is expelled after it, and a standby then takes over.
    fn ttl(&self) -> Duration {
        self.config.lease_session_timeout
    }

    async fn try_acquire(&self) -> Result<bool> {
        let topic = self.topic()?.to_owned();
        let mut candidate = self.candidate.lock().await;
        if candidate
            .member
            .as_ref()
            .is_some_and(|m| m.task.is_finished())
        {
            // Its consumer failed for good: join again with a new one.
            candidate.member = None;
        }
        let epoch = match candidate.epoch {
            Some(epoch) => epoch,
            None => *candidate.epoch.insert(self.current_epoch().await?),
        };
        let mut member = match candidate.member.take() {
            Some(member) => member,
            None => self.join(epoch).await?,
        };
        // A renewal in the next epoch's group: this one was given up as stuck. A failed look
        // keeps the membership (and so the time it joined, which the stale check counts
        // from): a slow broker must not make a standby rejoin on every try and never see the
        // group stale. A holder that cannot look does not claim the lease; a standby carries
        // on (it claims nothing, and if the group is stale it moves to the next one anyway).
        let moved = match last_renewal(Arc::clone(&member.next), &topic, self.ttl() / 3).await {
            Ok(renewal) => renewal.is_some(),
            Err(error) if member.holds() => {
                candidate.member = Some(member);
                return Err(error);
            }
            Err(error) => {
                tracing::debug!(lease = %topic, %error, "could not read the next epoch's renewals; looking again at the next try");
                false
            }
        };
        if moved {
            tracing::info!(lease = %topic, epoch = epoch + 1, "the Kafka lease moved to the next epoch's group; following it");
            let held = member.holds();
            self.close(member).await;
            candidate.epoch = Some(epoch + 1);
            if held {
                return Ok(false);
            }
            member = self.join(epoch + 1).await?;
        }
        self.answered(&member).await;
        let stuck = if !member.holds() && member.joined.elapsed() >= self.stale() {
            match self.stuck(&member, &topic).await {
                Ok(stuck) => stuck,
                Err(error) => {
                    candidate.member = Some(member);
                    return Err(error);
                }
            }
        } else {
            false
        };
        if stuck {
            let next = member.epoch + 1;
            tracing::warn!(lease = %topic, epoch = next, stale = ?self.stale(), "no renewal of the Kafka lease for a long time and the group hands nothing on (a holder that died, on a broker whose coordinator does not expel it): moving to the next epoch's group");
            self.close(member).await;
            candidate.epoch = Some(next);
            member = self.join(next).await?;
            self.answered(&member).await;
        }
        let held = member.holds();
        let member = candidate.member.insert(member);
        if !held {
            return Ok(false);
        }
        self.confirm(member).await
    }

    async fn release(&self) -> Result<()> {
        let member = self.candidate.lock().await.member.take();
        if let Some(member) = member {
            self.close(member).await;
        }
        Ok(())
    }
}

impl KafkaLease {
    /// How long a standby waits without any renewal in its group before it gives the group
    /// up.
    fn stale(&self) -> Duration {
        self.ttl() * STALE_RENEWALS
    }

    /// Waits (at most a session timeout) for the group's first answer to a new member: a
    /// join and a sync round.
    async fn answered(&self, member: &Member) {
        let mut state = member.state.clone();
        let _ =
            tokio::time::timeout(self.ttl(), state.wait_for(|s| *s != Membership::Joining)).await;
    }

    /// Whether the member's group looks stuck: no renewal in it for [`Self::stale`].
    async fn stuck(&self, member: &Member, topic: &str) -> Result<bool> {
        let handle = Arc::clone(&member.handle);
        let topic_name = topic.to_owned();
        let timeout = self.ttl() / 3;
        let renewed = tokio::task::spawn_blocking(move || -> Result<Option<i64>> {
            let consumer = handle.consumer().map_err(kafka_error)?;
            committed_renewal(consumer, &topic_name, timeout)
        })
        .await
        .map_err(|e| {
            failure(
                true,
                format!("reading the Kafka lease's renewals failed: {e}"),
            )
        })??;
        let stale = i64::try_from(self.stale().as_millis()).unwrap_or(i64::MAX);
        Ok(renewed.is_none_or(|at| now_ms().saturating_sub(at) > stale))
    }

    /// Closes a membership: leaves the group, waiting for that at most a session timeout.
    async fn close(&self, member: Member) {
        let Member {
            _stop,
            handle,
            closed,
            ..
        } = member;
        // The task closes the consumer once the last handle goes: this one, the task's own
        // (it stops when `_stop` is dropped) and any renewal still waiting.
        drop(_stop);
        drop(handle);
        // Waits for the group to hear of it, so that a standby's next try can take the lease;
        // but no longer than the coordinator would take to expel a dead member anyway.
        let timeout = self.ttl();
        if tokio::time::timeout(timeout, closed).await.is_err() {
            tracing::debug!(lease = ?self.topic, ?timeout, "the Kafka lease consumer did not close in time; it leaves the group when it does");
        }
    }
}

/// The lease consumer: a group consumer whose partition 0 is the lease.
type LeaseConsumer = StreamConsumer<LeaseContext>;

/// What a candidate knows from its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    /// Joined nothing yet: waiting for the group's first assignment.
    Joining,
    /// A member; `holds`: partition 0 of the lease's topic is assigned to it.
    Member { holds: bool },
}

/// The consumer's callbacks: keep [`Membership`] in step with the assignment.
struct LeaseContext {
    topic: String,
    state: watch::Sender<Membership>,
}

impl LeaseContext {
    fn has_partition(&self, tpl: &TopicPartitionList) -> bool {
        tpl.elements()
            .iter()
            .any(|e| e.topic() == self.topic && e.partition() == 0)
    }
}

impl ClientContext for LeaseContext {}

impl ConsumerContext for LeaseContext {
    fn pre_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Before the partition goes: from here on, this candidate holds nothing.
        if let Rebalance::Revoke(tpl) = rebalance
            && self.has_partition(tpl)
        {
            tracing::debug!(lease = %self.topic, "Kafka lease partition revoked");
            self.state.send_replace(Membership::Member { holds: false });
        }
        if let Rebalance::Error(error) = rebalance {
            tracing::warn!(lease = %self.topic, %error, "Kafka lease rebalance failed");
        }
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = self.has_partition(tpl);
            if assigned {
                tracing::debug!(lease = %self.topic, "Kafka lease partition assigned");
                // Nothing is ever written to the lease's topic: do not fetch from it.
                if let Err(error) = base.pause(tpl) {
                    tracing::debug!(lease = %self.topic, %error, "pausing the lease partition failed");
                }
            }
            self.state.send_modify(|state| {
                let held = matches!(state, Membership::Member { holds: true });
                *state = Membership::Member {
                    holds: held || assigned,
                };
            });
        }
    }
}

/// One membership of a candidate in the lease's group.
struct Member {
    /// Dropped to stop the polling task.
    _stop: oneshot::Sender<()>,
    handle: Arc<Handle>,
    state: watch::Receiver<Membership>,
    task: JoinHandle<()>,
    /// Fires once the consumer has closed (and so left the group).
    closed: oneshot::Receiver<()>,
    /// A renewal's commit that had not been answered when it was last awaited.
    renewal: Option<JoinHandle<rdkafka::error::KafkaResult<()>>>,
    /// The epoch of the group it joined.
    epoch: u64,
    /// When it joined.
    joined: Instant,
    /// A client of the next epoch's group (it never joins: it reads that group's renewals).
    next: Arc<BaseConsumer>,
}

impl Member {
    fn holds(&self) -> bool {
        matches!(*self.state.borrow(), Membership::Member { holds: true })
    }

    /// Records that the coordinator no longer counts this member as the holder.
    fn lose(&self) {
        self.handle.lose();
    }
}

/// Owns the consumer; whoever drops the last handle closes it, on a thread of its own.
struct Handle {
    consumer: Option<LeaseConsumer>,
    _live: LiveConsumer,
    closed: Option<oneshot::Sender<()>>,
}

impl Handle {
    fn consumer(&self) -> rdkafka::error::KafkaResult<&LeaseConsumer> {
        self.consumer
            .as_ref()
            .ok_or(rdkafka::error::KafkaError::ConsumerCommit(
                RDKafkaErrorCode::State,
            ))
    }

    fn lose(&self) {
        if let Some(consumer) = &self.consumer {
            consumer
                .context()
                .state
                .send_replace(Membership::Member { holds: false });
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let consumer = self.consumer.take();
        let closed = self.closed.take();
        // Closing leaves the group, which blocks for as long as the cluster is away.
        close_detached(move || {
            drop(consumer);
            if let Some(closed) = closed {
                let _ = closed.send(());
            }
        });
    }
}

/// Polls the lease consumer until stopped: librdkafka serves rebalances (and counts the
/// member alive) only while its consumer is polled.
async fn poll(handle: Arc<Handle>, mut stop: oneshot::Receiver<()>, topic: String) {
    let Ok(consumer) = handle.consumer() else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            message = consumer.recv() => match message {
                // Nobody writes to the lease's topic, and its partition is paused.
                Ok(_) => {}
                Err(error) => {
                    let error = kafka_error(error);
                    if error.is_temporary() {
                        tracing::debug!(lease = %topic, %error, "Kafka lease consumer error; carrying on");
                    } else {
                        tracing::warn!(lease = %topic, %error, "Kafka lease consumer failed; the next try joins again");
                        handle.lose();
                        break;
                    }
                }
            },
        }
    }
}

/// How many session timeouts without a renewal make a standby give its group up.
pub(crate) const STALE_RENEWALS: u32 = 3;

/// Epochs looked at when a candidate starts (the lease moves to a new epoch only when a
/// group got stuck, so this is never reached in practice).
const MAX_EPOCHS: u64 = 1_000;

/// The consumer group of a lease's `epoch`.
fn group(topic: &str, epoch: u64) -> String {
    if epoch == 0 {
        topic.to_owned()
    } else {
        format!("{topic}.epoch{epoch}")
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// When the holder of `consumer`'s group last renewed the lease (the committed offset's
/// metadata), `Some(0)` for a renewal that recorded no time, `None` when nobody ever did.
fn committed_renewal<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(kafka_error)?;
    Ok(committed
        .find_partition(topic, 0)
        .filter(|e| matches!(e.offset(), Offset::Offset(_)))
        .map(|e| e.metadata().parse().unwrap_or(0)))
}

/// [`committed_renewal`] off the async threads.
async fn last_renewal(
    consumer: Arc<BaseConsumer>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i64>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || committed_renewal(&*consumer, &topic, timeout))
        .await
        .map_err(|e| {
            failure(
                true,
                format!("reading the Kafka lease's renewals failed: {e}"),
            )
        })?
}
