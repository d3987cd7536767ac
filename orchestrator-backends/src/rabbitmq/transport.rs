//! `RabbitMqTransport`: a topic exchange, a durable queue per consumer group.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};

use async_trait::async_trait;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use orchestrator_core::transport::{validate_group, validate_topic};
use orchestrator_core::{
    DeadLetterQueue, DeliveryStream, Error, EventEnvelope, Result, SubscribeOptions, Transport,
    cloudevents,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::config::RabbitMqConfig;
use super::connection::{Connector, Outgoing, Publisher, Setup, from_lapin, short};
use super::consumer::RabbitMqDeliveryStream;
use super::dlq::RabbitMqDeadLetterQueue;
use super::wire;

/// A [`Transport`] on RabbitMQ: events go through a durable topic exchange to one durable
/// queue per consumer group, with publisher confirms, manual acks, delayed retries through
/// TTL queues and a durable dead-letter queue. See the [module docs](super) for the
/// topology and the wire format.
///
/// Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct RabbitMqTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqTransport")
            .field("exchange", &self.inner.config.exchange())
            .field("queue_prefix", &self.inner.config.queue_prefix())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: RabbitMqConfig,
    pub(crate) exchange: ShortString,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) consuming: Arc<Connector>,
    pub(crate) dlq: RabbitMqDeadLetterQueue,
    /// Queues declared by this transport: retry queues are declared once, and
    /// [`RabbitMqTransport::delete_topology`] knows what to delete.
    declared: StdMutex<BTreeSet<String>>,
    /// The groups subscribed as ephemeral here: their queues expire, and are deleted when
    /// their consumer stops.
    ephemeral: StdMutex<BTreeSet<String>>,
    pub(crate) closed: watch::Sender<bool>,
}

impl Inner {
    /// The arguments of `group`'s work queue (with `extra_ms` 0) and retry queues (with
    /// their tier): only `x-expires`, when configured, or when the group is ephemeral (then
    /// its expiry plus `extra_ms`, so a retry queue outlives the messages it holds).
    pub(crate) fn queue_arguments(&self, group: &str, extra_ms: u64) -> FieldTable {
        let mut arguments = FieldTable::default();
        let (expiry, extra_ms) = if self.is_ephemeral(group) {
            (Some(self.config.ephemeral_expiry()), extra_ms)
        } else {
            (self.config.queue_expiry(), 0)
        };
        if let Some(expiry) = expiry {
            let ms = u64::try_from(expiry.as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
                .saturating_add(extra_ms);
            arguments.insert("x-expires".into(), wire::number(ms));
        }
        arguments
    }

    /// Whether `group` was subscribed as ephemeral by this transport.
    pub(crate) fn is_ephemeral(&self, group: &str) -> bool {
        self.ephemeral
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(group)
    }

    pub(crate) fn mark_ephemeral(&self, group: &str) {
        self.ephemeral
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group.to_owned());
    }

    /// Deletes an ephemeral group's work queue and the retry queues this transport declared
    /// for it (their messages too): its consumer is gone.
    pub(crate) async fn delete_group(&self, group: &str) -> Result<()> {
        let work = self.config.group_queue(group);
        let retry_prefix = self.config.retry_queue(group, 0);
        let retry_prefix = retry_prefix.trim_end_matches("0ms");
        let mut queues: Vec<String> = self
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|q| {
                q.strip_prefix(retry_prefix)
                    .and_then(|tier| tier.strip_suffix("ms"))
                    .is_some_and(|tier| {
                        !tier.is_empty() && tier.bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .cloned()
            .collect();
        queues.push(work);
        for queue in &queues {
            let name = short("queue", queue)?;
            self.publisher
                .declare(|channel: Channel| {
                    let name = name.clone();
                    async move {
                        channel
                            .queue_delete(name, QueueDeleteOptions::default())
                            .await
                            .map(drop)
                    }
                })
                .await?;
            self.forget(queue);
        }
        self.ephemeral
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(group);
        tracing::debug!(group, queues = queues.len(), "ephemeral group deleted");
        Ok(())
    }

    pub(crate) fn remember(&self, queue: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(queue.to_owned())
    }

    pub(crate) fn forget(&self, queue: &str) {
        self.declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(queue);
    }

    fn is_declared(&self, queue: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(queue)
    }

    /// Declares the group's work queue on the publishing channel (idempotent).
    pub(crate) async fn declare_group_queue(&self, group: &str, queue: &ShortString) -> Result<()> {
        if self.is_declared(queue.as_str()) {
            return Ok(());
        }
        let arguments = self.queue_arguments(group, 0);
        self.publisher
            .declare(|channel: Channel| {
                let (queue, arguments) = (queue.clone(), arguments.clone());
                async move {
                    channel
                        .queue_declare(queue, durable_queue(), arguments)
                        .await
                        .map(drop)
                }
            })
            .await?;
        self.remember(queue.as_str());
        Ok(())
    }

    /// Declares a retry queue: messages expire after their own `expiration` and RabbitMQ
    /// dead-letters them through the default exchange back to the group's work queue.
    ///
    /// An ephemeral group's retry queue is declared again each time (a declaration resets
    /// its expiry), so it cannot expire while it holds a message.
    pub(crate) async fn declare_retry_queue(
        &self,
        group: &str,
        tier_ms: u64,
        work: &ShortString,
        force: bool,
    ) -> Result<ShortString> {
        let retry = short("retry queue", &self.config.retry_queue(group, tier_ms))?;
        let ephemeral = self.is_ephemeral(group);
        if !force && !ephemeral && self.is_declared(retry.as_str()) {
            return Ok(retry);
        }
        let mut arguments = self.queue_arguments(group, tier_ms);
        arguments.insert("x-dead-letter-exchange".into(), wire::text(""));
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(work.as_str().into()),
        );
        self.publisher
            .declare(|channel: Channel| {
                let (retry, arguments) = (retry.clone(), arguments.clone());
                async move {
                    channel
                        .queue_declare(retry, durable_queue(), arguments)
                        .await
                        .map(drop)
                }
            })
            .await?;
        self.remember(retry.as_str());
        Ok(retry)
    }
}

pub(crate) fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

pub(crate) fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares the event exchange, the dead-letter exchange and queue, and binds them.
pub(crate) async fn declare_base(
    channel: Channel,
    exchange: ShortString,
    dead_letter_exchange: ShortString,
    dead_letter_queue: ShortString,
) -> Result<()> {
    channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(from_lapin)?;
    channel
        .exchange_declare(
            dead_letter_exchange.clone(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(from_lapin)?;
    channel
        .queue_declare(
            dead_letter_queue.clone(),
            durable_queue(),
            FieldTable::default(),
        )
        .await
        .map_err(from_lapin)?;
    channel
        .queue_bind(
            dead_letter_queue,
            dead_letter_exchange,
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(from_lapin)
}

impl RabbitMqTransport {
    /// Connects to the broker and declares the exchange and the dead-letter queue.
    ///
    /// Fails with a temporary [`Error::Backend`] when the broker cannot be reached within
    /// the connect timeout, and with [`Error::InvalidInput`] for unusable names. Once
    /// connected, lost connections are re-established as needed.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self> {
        config.validate()?;
        let exchange = short("exchange", config.exchange())?;
        let dlx = short("dead-letter exchange", &config.dead_letter_exchange())?;
        let dlq = short("dead-letter queue", &config.dead_letter_queue())?;
        let setup: Setup = {
            let (exchange, dlx, dlq) = (exchange.clone(), dlx.clone(), dlq.clone());
            Box::new(move |channel| {
                let (exchange, dlx, dlq) = (exchange.clone(), dlx.clone(), dlq.clone());
                Box::pin(declare_base(channel, exchange, dlx, dlq))
            })
        };
        let publisher = Arc::new(Publisher::new(
            Connector::new(
                config.url(),
                format!("{}-publish", config.connection_name()),
                config.backoff(),
            ),
            config.publish_timeout(),
            setup,
        ));
        publisher.ready(config.connect_timeout()).await?;
        let consuming = Arc::new(Connector::new(
            config.url(),
            format!("{}-consume", config.connection_name()),
            config.backoff(),
        ));
        let dead_letters = RabbitMqDeadLetterQueue::new(
            publisher.clone(),
            consuming.clone(),
            dlx,
            dlq,
            config.publish_timeout(),
        );
        let (closed, _) = watch::channel(false);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                exchange,
                publisher,
                consuming,
                dlq: dead_letters,
                declared: StdMutex::new(BTreeSet::new()),
                ephemeral: StdMutex::new(BTreeSet::new()),
                closed,
            }),
        })
    }

    /// The settings this transport runs with.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }

    /// The dead-letter queue, as its concrete type.
    pub fn dead_letters(&self) -> &RabbitMqDeadLetterQueue {
        &self.inner.dlq
    }

    /// How many messages this transport published again after their publisher confirms
    /// were lost (a connection that dropped mid-publish): each may be a copy of a message the
    /// broker had already taken, delivered once more without the redelivered flag. The one
    /// source of duplicates besides redeliveries.
    pub fn republished_messages(&self) -> u64 {
        self.inner.publisher.republished()
    }

    /// Stops every subscription (their `next()` returns `Ok(None)`) and closes the
    /// connections. Deliveries not yet settled return to their queues.
    pub async fn close(&self) {
        self.inner.closed.send_replace(true);
        self.inner.publisher.close().await;
        self.inner.consuming.close().await;
    }

    /// Deletes what this transport declared: the queues of the groups it subscribed or
    /// redelivered to and their retry queues, the dead-letter queue and exchange, and the
    /// event exchange — messages included. For tests and teardown; other processes'
    /// queues bound to the exchange lose their bindings.
    pub async fn delete_topology(&self) -> Result<()> {
        let queues: Vec<String> = self
            .inner
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        let config = &self.inner.config;
        let exchanges = [config.exchange().to_owned(), config.dead_letter_exchange()];
        let deadline = Instant::now() + config.publish_timeout();
        let channel = self.inner.publisher.channel(deadline).await?;
        for queue in queues.iter().chain([&config.dead_letter_queue()]) {
            channel
                .queue_delete(short("queue", queue)?, QueueDeleteOptions::default())
                .await
                .map_err(from_lapin)?;
            self.inner.forget(queue);
        }
        for exchange in exchanges {
            channel
                .exchange_delete(
                    short("exchange", &exchange)?,
                    ExchangeDeleteOptions::default(),
                )
                .await
                .map_err(from_lapin)?;
        }
        Ok(())
    }

    /// The message for `event`, refused if its body is over the maximum event size.
    fn message(&self, topic: &str, event: &EventEnvelope) -> Result<Outgoing> {
        let body = cloudevents::encode(event)?;
        self.inner.config.max_event_size().check_len(body.len())?;
        Ok(Outgoing {
            exchange: self.inner.exchange.clone(),
            routing_key: short("topic", topic)?,
            body,
            properties: wire::event_properties(event),
            mandatory: false,
        })
    }
}

#[async_trait]
impl Transport for RabbitMqTransport {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_topic(topic)?;
        let message = self.message(topic, &event)?;
        self.inner.publisher.publish(&[message]).await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        validate_topic(topic)?;
        let messages = events
            .iter()
            .map(|event| self.message(topic, event))
            .collect::<Result<Vec<_>>>()?;
        if messages.is_empty() {
            return Ok(());
        }
        self.inner.publisher.publish(&messages).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>> {
        validate_group(&options.group)?;
        if options.patterns.is_empty() {
            return Err(Error::invalid(
                "subscription",
                format!("group `{}` subscribes to no pattern", options.group),
            ));
        }
        for pattern in &options.patterns {
            short("topic pattern", pattern.as_str())?;
        }
        let stream = RabbitMqDeliveryStream::open(self.inner.clone(), options).await?;
        Ok(Box::new(stream))
    }

    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_group(group)?;
        validate_topic(topic)?;
        let queue = short("group queue", &self.inner.config.group_queue(group))?;
        self.inner.declare_group_queue(group, &queue).await?;
        let properties = wire::set_header(
            wire::event_properties(&event),
            wire::TOPIC,
            wire::text(topic),
        );
        let message = Outgoing {
            exchange: ShortString::default(),
            routing_key: queue,
            body: cloudevents::encode(&event)?,
            properties,
            mandatory: true,
        };
        self.inner.publisher.publish(&[message]).await
    }

    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        Arc::new(self.inner.dlq.clone())
    }
}
