//! The dead-letter queue: a durable RabbitMQ queue fed by a fanout exchange.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use orchestrator_core::cloudevents::{self, CLOUDEVENTS_JSON};
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, EventEnvelope, Result};
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout};

use super::connection::{
    Connector, Outgoing, Publisher, close_channel, failure, from_lapin, is_not_found,
};
use super::wire;

/// The event type given to a dead letter whose message was not a CloudEvent; its payload
/// is the message body as it arrived (`application/octet-stream`).
pub const UNDECODABLE_EVENT_TYPE: &str = "orchestrator.undecodable";

/// How long a scan waits for the next letter before giving up on the rest.
const SCAN_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The dead letters of a [`RabbitMqTransport`](super::RabbitMqTransport), parked in the
/// durable queue `<prefix>.dead-letters`.
///
/// Each letter is one persistent message: the body is the event as CloudEvents JSON (or,
/// for a message that was not a CloudEvent, the body as it arrived), the letter's id is
/// the message id, and the reason, attempts, failure times, topic and group are headers
/// (`x-orchestrator-reason`, `-attempts`, `-first-failure-at`, `-last-failure-at`,
/// `-topic`, `-group`, `-letter-id`).
///
/// Reading never loses a letter: `list`, `get` and `remove` consume the queue on a channel
/// of their own without acknowledging, stop as soon as they have their answer, and close
/// the channel, which puts every letter back in its place; `remove` acknowledges just the
/// letter it removes. Each call therefore reads the queue up to its answer (`len` reads
/// nothing). Calls of one process are serialised; a reader in another process that runs
/// at the same moment may miss the letters this one holds for that moment.
#[derive(Clone)]
pub struct RabbitMqDeadLetterQueue {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Arc<Publisher>,
    reader: Arc<Connector>,
    exchange: ShortString,
    queue: ShortString,
    timeout: Duration,
    lock: Mutex<()>,
}

impl std::fmt::Debug for RabbitMqDeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqDeadLetterQueue")
            .field("exchange", &self.inner.exchange)
            .field("queue", &self.inner.queue)
            .finish_non_exhaustive()
    }
}

/// What a scan does with the letter it just read.
enum Step {
    Next,
    Stop,
    /// Acknowledge (remove) this letter, then stop.
    Take,
}

impl RabbitMqDeadLetterQueue {
    pub(crate) fn new(
        publisher: Arc<Publisher>,
        reader: Arc<Connector>,
        exchange: ShortString,
        queue: ShortString,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                publisher,
                reader,
                exchange,
                queue,
                timeout,
                lock: Mutex::new(()),
            }),
        }
    }

    /// The queue holding the letters.
    pub fn queue(&self) -> &str {
        self.inner.queue.as_str()
    }

    /// Parks a message that could not be decoded, with its body as it arrived.
    pub(crate) async fn push_raw(
        &self,
        body: Vec<u8>,
        original: &BasicProperties,
        reason: &str,
        topic: &str,
        group: &str,
        attempts: u32,
    ) -> Result<()> {
        let now = Utc::now();
        let id = uuid::Uuid::now_v7().to_string();
        let content_type = original
            .content_type()
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into());
        let properties = letter_properties(
            BasicProperties::default()
                .with_content_type(content_type)
                .with_headers(wire::headers_without_deaths(original)),
            &id,
            reason,
            topic,
            group,
            attempts,
            now,
            now,
        );
        self.publish(body, properties, group).await
    }

    async fn publish(&self, body: Vec<u8>, properties: BasicProperties, group: &str) -> Result<()> {
        let message = Outgoing {
            exchange: self.inner.exchange.clone(),
            routing_key: ShortString::try_new(group).unwrap_or_default(),
            body,
            properties,
            mandatory: true,
        };
        self.inner.publisher.publish(&[message]).await
    }

    /// Reads letters in queue order (oldest first), handing each to `visit`, until it says
    /// stop or every letter was read; then puts back every letter not taken.
    async fn scan(&self, mut visit: impl FnMut(DeadLetter) -> Step) -> Result<Option<DeadLetter>> {
        let _serialised = self.inner.lock.lock().await;
        let deadline = Instant::now() + self.inner.timeout;
        let channel = self.inner.reader.channel(deadline).await?;
        let result = self.scan_on(&channel, &mut visit).await;
        // Closing the channel returns every unacknowledged letter to its place.
        close_channel(&channel, "dead letters read").await;
        result
    }

    async fn scan_on(
        &self,
        channel: &Channel,
        visit: &mut impl FnMut(DeadLetter) -> Step,
    ) -> Result<Option<DeadLetter>> {
        let count = match self.count_on(channel).await? {
            0 => return Ok(None),
            n => n,
        };
        let prefetch = u16::try_from(count).unwrap_or(u16::MAX).min(1000);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(from_lapin)?;
        let mut consumer = channel
            .basic_consume(
                self.inner.queue.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(from_lapin)?;
        for _ in 0..count {
            let delivery = match timeout(SCAN_STEP_TIMEOUT, consumer.next()).await {
                Ok(Some(Ok(delivery))) => delivery,
                Ok(Some(Err(e))) => return Err(from_lapin(e)),
                // Fewer letters than counted: another reader holds some.
                Ok(None) | Err(_) => break,
            };
            let letter = decode_letter(&delivery.data, &delivery.properties);
            match visit(letter.clone()) {
                Step::Next => {}
                Step::Stop => break,
                Step::Take => {
                    delivery
                        .acker
                        .ack(Default::default())
                        .await
                        .map_err(from_lapin)?;
                    return Ok(Some(letter));
                }
            }
        }
        Ok(None)
    }

    async fn count_on(&self, channel: &Channel) -> Result<u32> {
        let declared = channel
            .queue_declare(
                self.inner.queue.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => Ok(queue.message_count()),
            // Not declared yet (or deleted): no letters.
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(from_lapin(e)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn letter_properties(
    base: BasicProperties,
    id: &str,
    reason: &str,
    topic: &str,
    group: &str,
    attempts: u32,
    first_failure_at: chrono::DateTime<Utc>,
    last_failure_at: chrono::DateTime<Utc>,
) -> BasicProperties {
    let mut headers = base.headers().clone().unwrap_or_default();
    headers.insert(wire::LETTER_ID.into(), wire::text(id));
    headers.insert(wire::REASON.into(), wire::text(wire::truncate(reason)));
    headers.insert(wire::ATTEMPTS.into(), wire::number(u64::from(attempts)));
    headers.insert(wire::FIRST_FAILURE_AT.into(), wire::time(first_failure_at));
    headers.insert(wire::LAST_FAILURE_AT.into(), wire::time(last_failure_at));
    headers.insert(wire::TOPIC.into(), wire::text(topic));
    headers.insert(wire::GROUP.into(), wire::text(group));
    let mut properties = base
        .with_delivery_mode(wire::PERSISTENT)
        .with_timestamp(u64::try_from(last_failure_at.timestamp()).unwrap_or(0))
        .with_headers(headers);
    if let Ok(id) = ShortString::try_new(id) {
        properties = properties.with_message_id(id);
    }
    properties
}

/// A letter from its message; a body that is not a CloudEvent becomes an
/// [`UNDECODABLE_EVENT_TYPE`] event carrying the body.
fn decode_letter(body: &[u8], properties: &BasicProperties) -> DeadLetter {
    let id = wire::header_str(properties, wire::LETTER_ID)
        .or_else(|| properties.message_id().as_ref().map(|m| m.to_string()))
        .unwrap_or_default();
    let event = cloudevents::decode(body).unwrap_or_else(|_| undecodable(body, &id));
    let now = Utc::now();
    let last = wire::header_time(properties, wire::LAST_FAILURE_AT).unwrap_or(now);
    DeadLetter {
        id,
        event,
        topic: wire::header_str(properties, wire::TOPIC).unwrap_or_default(),
        subscription: wire::header_str(properties, wire::GROUP).unwrap_or_default(),
        reason: wire::header_str(properties, wire::REASON).unwrap_or_default(),
        attempts: wire::header_u64(properties, wire::ATTEMPTS)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1),
        first_failure_at: wire::header_time(properties, wire::FIRST_FAILURE_AT).unwrap_or(last),
        last_failure_at: last,
    }
}

fn undecodable(body: &[u8], letter_id: &str) -> EventEnvelope {
    // Proven invariant: `from_bytes` checks only the type name and that the content type is
    // not empty, and both are constants that pass.
    #[allow(clippy::expect_used)]
    let envelope = EventEnvelope::from_bytes(
        UNDECODABLE_EVENT_TYPE,
        "application/octet-stream",
        body.to_vec(),
    )
    .expect("constant type and content type are valid");
    match orchestrator_core::EventId::parse(letter_id) {
        Ok(id) => envelope.with_id(id),
        Err(_) => envelope,
    }
}

#[async_trait]
impl DeadLetterQueue for RabbitMqDeadLetterQueue {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    async fn push(&self, letter: DeadLetter) -> Result<()> {
        let body = cloudevents::encode(&letter.event)?;
        let properties = letter_properties(
            wire::event_properties(&letter.event).with_content_type(CLOUDEVENTS_JSON.into()),
            &letter.id,
            &letter.reason,
            &letter.topic,
            &letter.subscription,
            letter.attempts,
            letter.first_failure_at,
            letter.last_failure_at,
        );
        self.publish(body, properties, &letter.subscription).await
    }

    async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let mut skipped = 0;
        let mut found = Vec::new();
        self.scan(|letter| {
            if query.matches(&letter) {
                if skipped < query.offset {
                    skipped += 1;
                } else {
                    found.push(letter);
                    if found.len() >= query.limit {
                        return Step::Stop;
                    }
                }
            }
            Step::Next
        })
        .await?;
        Ok(found)
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let mut found = None;
        self.scan(|letter| {
            if letter.id == id {
                found = Some(letter);
                Step::Stop
            } else {
                Step::Next
            }
        })
        .await?;
        Ok(found)
    }

    async fn remove(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.scan(|letter| {
            if letter.id == id {
                Step::Take
            } else {
                Step::Next
            }
        })
        .await
    }

    async fn len(&self) -> Result<usize> {
        let _serialised = self.inner.lock.lock().await;
        let deadline = Instant::now() + self.inner.timeout;
        let channel = self.inner.reader.channel(deadline).await?;
        let count = self.count_on(&channel).await;
        close_channel(&channel, "dead letters counted").await;
        let count = count?;
        usize::try_from(count).map_err(|_| failure(false, "dead-letter count overflows usize"))
    }
}
