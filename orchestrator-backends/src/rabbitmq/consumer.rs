//! A consumer group's deliveries: consuming its queue, settling each message, and coming
//! back after the connection dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use orchestrator_core::{
    Acknowledge, DeadLetter, Delivery, DeliveryInfo, DeliveryStream, Result, SubscribeOptions,
};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep, sleep, timeout};

use super::connection::{Outgoing, SETTLE_TIMEOUT, close_channel, failure, from_lapin, short};
use super::transport::{Inner, durable_exchange, durable_queue};
use super::wire;

/// The deliveries of one consumer of a group: a `basic.consume` on the group's queue, on a
/// channel of its own, with the subscription's prefetch.
pub(crate) struct RabbitMqDeliveryStream {
    inner: Arc<Inner>,
    options: SubscribeOptions,
    queue: ShortString,
    current: Option<(Channel, Consumer)>,
    closed: watch::Receiver<bool>,
    failures: u32,
    /// Fires every [`LIVENESS_CHECK`]: one timer for the stream's life, not one per `next`.
    liveness: Pin<Box<Sleep>>,
}

impl RabbitMqDeliveryStream {
    /// Declares the group's queue and bindings and starts consuming, so that every event
    /// published after this returns reaches the group.
    pub(crate) async fn open(inner: Arc<Inner>, options: SubscribeOptions) -> Result<Self> {
        let queue = short("group queue", &inner.config.group_queue(&options.group))?;
        let closed = inner.closed.subscribe();
        if options.ephemeral {
            inner.mark_ephemeral(&options.group);
        }
        let mut stream = Self {
            inner,
            options,
            queue,
            current: None,
            closed,
            failures: 0,
            liveness: Box::pin(sleep(LIVENESS_CHECK)),
        };
        let deadline = Instant::now() + stream.inner.config.connect_timeout();
        stream.current = Some(stream.attach(deadline).await?);
        Ok(stream)
    }

    async fn attach(&self, deadline: Instant) -> Result<(Channel, Consumer)> {
        let channel = self.inner.consuming.channel(deadline).await?;
        match self.consume_on(&channel).await {
            Ok(consumer) => Ok((channel, consumer)),
            Err(e) => {
                close_channel(&channel, "subscription failed").await;
                Err(e)
            }
        }
    }

    async fn consume_on(&self, channel: &Channel) -> Result<Consumer> {
        let inner = &self.inner;
        channel
            .exchange_declare(
                inner.exchange.clone(),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(from_lapin)?;
        channel
            .queue_declare(
                self.queue.clone(),
                durable_queue(),
                inner.queue_arguments(&self.options.group, 0),
            )
            .await
            .map_err(from_lapin)?;
        inner.remember(self.queue.as_str());
        for pattern in &self.options.patterns {
            // Our patterns are AMQP topic patterns as they are: `*` one word, `#` any.
            channel
                .queue_bind(
                    self.queue.clone(),
                    inner.exchange.clone(),
                    short("topic pattern", pattern.as_str())?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(from_lapin)?;
        }
        let prefetch = u16::try_from(self.options.prefetch.max(1)).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(from_lapin)?;
        channel
            .basic_consume(
                self.queue.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(from_lapin)
    }

    /// Turns a message into a delivery; a message that is not a CloudEvent is parked in the
    /// dead-letter queue with the reason (in a task of its own, so that a cancelled `next`
    /// cannot leave it half done) and `None` is returned.
    fn delivery(&self, message: lapin::message::Delivery) -> Option<Delivery> {
        let properties = &message.properties;
        let topic = wire::header_str(properties, wire::TOPIC)
            .unwrap_or_else(|| message.routing_key.to_string());
        let stored_attempt = wire::header_u64(properties, wire::ATTEMPT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
        // A message the broker hands out again (its consumer went away without settling
        // it) counts one more attempt; AMQP only says "redelivered", not how often.
        let attempt = stored_attempt.saturating_add(u32::from(message.redelivered));
        let first_attempt_at =
            wire::header_time(properties, wire::FIRST_ATTEMPT_AT).unwrap_or_else(Utc::now);
        // A message over the limit is dead-lettered undecoded.
        let event = match self.inner.config.max_event_size().decode(&message.data) {
            Ok(event) => event,
            Err(error) => {
                let reason = format!("the message is not a CloudEvent: {error}");
                tracing::warn!(group = %self.options.group, %topic, %reason, "dead-lettering a message");
                let (inner, group) = (self.inner.clone(), self.options.group.clone());
                tokio::spawn(async move {
                    let parked = inner
                        .dlq
                        .push_raw(
                            message.data,
                            &message.properties,
                            &reason,
                            &topic,
                            &group,
                            attempt,
                        )
                        .await;
                    let settle = async {
                        match parked {
                            Ok(()) => message.acker.ack(BasicAckOptions::default()).await,
                            // Not parked: give it back, to be read again rather than lost.
                            Err(error) => {
                                tracing::error!(%error, "could not dead-letter an undecodable message");
                                message.acker.nack(requeue()).await
                            }
                        }
                    };
                    if let Ok(Err(error)) = timeout(SETTLE_TIMEOUT, settle).await {
                        tracing::warn!(%error, "settling an undecodable message failed; it will come back");
                    }
                });
                return None;
            }
        };
        let info = DeliveryInfo {
            topic: Some(topic.as_str().into()),
            group: self.options.group.as_str().into(),
            attempt,
            first_attempt_at,
            last_error: wire::header_str(properties, wire::LAST_ERROR),
        };
        let acker = RabbitMqAcker {
            inner: self.inner.clone(),
            acker: Some(message.acker),
            queue: self.queue.clone(),
            group: self.options.group.clone(),
            topic,
            attempt,
            first_attempt_at,
            body: message.data,
            properties: message.properties,
        };
        Some(Delivery::new(event, info, Box::new(acker)))
    }

    async fn detach(&mut self) {
        if let Some((channel, _)) = self.current.take() {
            close_channel(&channel, "consumer restarting").await;
        }
    }
}

/// How often an idle consumer checks that its channel is still open.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

#[async_trait]
impl DeliveryStream for RabbitMqDeliveryStream {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        loop {
            if *self.closed.borrow() {
                self.detach().await;
                return Ok(None);
            }
            let Some((channel, consumer)) = self.current.as_mut() else {
                let deadline = Instant::now() + self.inner.config.connect_timeout();
                let mut closed = self.closed.clone();
                let attached = tokio::select! {
                    attached = self.attach(deadline) => attached,
                    _ = closed.changed() => continue,
                };
                match attached {
                    Ok(current) => {
                        tracing::info!(group = %self.options.group, "consumer re-attached");
                        self.current = Some(current);
                        self.failures = 0;
                    }
                    Err(error) if error.is_temporary() => {
                        self.failures = self.failures.saturating_add(1);
                        let delay = self.inner.consuming.backoff().delay(self.failures);
                        tracing::warn!(group = %self.options.group, %error, ?delay, "re-attaching failed; retrying");
                        tokio::select! {
                            () = sleep(delay) => {}
                            _ = self.closed.changed() => {}
                        }
                    }
                    Err(error) => return Err(error),
                }
                continue;
            };
            let next = tokio::select! {
                next = consumer.next() => Some(next),
                _ = self.closed.changed() => continue,
                () = self.liveness.as_mut() => None,
            };
            let Some(next) = next else {
                self.liveness
                    .as_mut()
                    .reset(Instant::now() + LIVENESS_CHECK);
                // Quiet for a while: make sure the channel still lives, since lapin does not
                // always wake a consumer whose connection died.
                if !channel.status().connected() {
                    tracing::warn!(group = %self.options.group, "consumer channel closed; re-attaching");
                    self.detach().await;
                }
                continue;
            };
            match next {
                Some(Ok(message)) => {
                    if let Some(delivery) = self.delivery(message) {
                        return Ok(Some(delivery));
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(group = %self.options.group, %error, "consumer lost its connection; re-attaching");
                    self.detach().await;
                    // Let the broker come back before the first attempt.
                    sleep(Duration::from_millis(50)).await;
                }
                None => {
                    tracing::warn!(group = %self.options.group, "consumer cancelled by the broker; re-attaching");
                    self.detach().await;
                }
            }
        }
    }
}

/// Settles one message. Dropped unsettled, it hands the message back to the broker
/// (`basic.nack` with requeue), which delivers it again at once.
struct RabbitMqAcker {
    inner: Arc<Inner>,
    acker: Option<lapin::Acker>,
    queue: ShortString,
    group: String,
    topic: String,
    attempt: u32,
    first_attempt_at: DateTime<Utc>,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl RabbitMqAcker {
    async fn settle_ack(&mut self) -> Result<()> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        match timeout(SETTLE_TIMEOUT, acker.ack(BasicAckOptions::default())).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) | Err(_) => Err(lost_channel()),
            Ok(Err(error)) => Err(from_lapin(error)),
        }
    }

    /// The message again, as attempt `attempt + 1`, with the reason as its last error.
    fn retry_properties(&self, reason: &str) -> BasicProperties {
        let mut headers = wire::headers_without_deaths(&self.properties);
        headers.insert(
            wire::ATTEMPT.into(),
            wire::number(u64::from(self.attempt) + 1),
        );
        headers.insert(wire::LAST_ERROR.into(), wire::text(wire::truncate(reason)));
        headers.insert(
            wire::FIRST_ATTEMPT_AT.into(),
            wire::time(self.first_attempt_at),
        );
        headers.insert(wire::TOPIC.into(), wire::text(&self.topic));
        self.properties
            .clone()
            .with_delivery_mode(wire::PERSISTENT)
            .with_headers(headers)
    }
}

fn lost_channel() -> orchestrator_core::Error {
    failure(
        true,
        "the channel of this delivery closed before it was settled (the connection dropped); \
         the broker delivers the message again",
    )
}

#[async_trait]
impl Acknowledge for RabbitMqAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle_ack().await
    }

    async fn nack(mut self: Box<Self>, delay: Duration, reason: String) -> Result<()> {
        let properties = self.retry_properties(&reason);
        let message = if delay.is_zero() {
            Outgoing {
                exchange: ShortString::default(),
                routing_key: self.queue.clone(),
                body: self.body.clone(),
                properties,
                mandatory: true,
            }
        } else {
            let retry = self
                .inner
                .declare_retry_queue(&self.group, wire::retry_tier(delay), &self.queue, false)
                .await?;
            Outgoing {
                exchange: ShortString::default(),
                routing_key: retry,
                body: self.body.clone(),
                properties: properties.with_expiration(wire::expiration(delay)),
                mandatory: true,
            }
        };
        let published = self
            .inner
            .publisher
            .publish(std::slice::from_ref(&message))
            .await;
        if let Err(error) = published {
            if error.is_temporary() || delay.is_zero() {
                return Err(error);
            }
            // Returned: the retry queue was deleted behind our back. Declare it again.
            self.inner
                .declare_retry_queue(&self.group, wire::retry_tier(delay), &self.queue, true)
                .await?;
            self.inner
                .publisher
                .publish(std::slice::from_ref(&message))
                .await?;
        }
        self.settle_ack().await
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        orchestrator_core::DeadLetterQueue::push(&self.inner.dlq, letter).await?;
        self.settle_ack().await
    }
}

impl Drop for RabbitMqDeliveryStream {
    /// An ephemeral group's queues go with its consumer (if there is no runtime to do it,
    /// or it fails, they expire: `x-expires`).
    fn drop(&mut self) {
        if !self.options.ephemeral {
            return;
        }
        let (inner, group) = (self.inner.clone(), self.options.group.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = inner.delete_group(&group).await {
                    tracing::warn!(%group, %error, "could not delete an ephemeral group's queues; they expire");
                }
            });
        }
    }
}

impl Drop for RabbitMqAcker {
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        if !acker.usable() {
            // The channel is gone; the broker already took the message back.
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Err(error)) = timeout(SETTLE_TIMEOUT, acker.nack(requeue())).await {
                    tracing::debug!(%error, "returning an unsettled delivery failed; the broker takes it back when the channel closes");
                }
            });
        }
    }
}
