//! Settings of the RabbitMQ transport and event store.

use std::time::Duration;

use orchestrator_core::{Error, MaxEventSize, Result};

use super::connection::{Backoff, short};

/// The default topic exchange events are published to.
pub const DEFAULT_EXCHANGE: &str = "orchestrator.events";
/// The default prefix of the transport's queue and dead-letter names.
pub const DEFAULT_QUEUE_PREFIX: &str = "orchestrator";
/// The default stream queue that holds the event store's global log.
pub const DEFAULT_STREAM: &str = "orchestrator.event-log";

/// Settings of a [`RabbitMqTransport`](super::RabbitMqTransport).
///
/// ```
/// use std::time::Duration;
/// use orchestrator_backends::rabbitmq::RabbitMqConfig;
///
/// let config = RabbitMqConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .with_exchange("shop.events")
///     .with_queue_prefix("shop")
///     .with_publish_timeout(Duration::from_secs(10));
/// assert_eq!(config.exchange(), "shop.events");
/// assert_eq!(config.group_queue("billing"), "shop.group.billing");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqConfig {
    url: String,
    exchange: String,
    queue_prefix: String,
    connection_name: String,
    connect_timeout: Duration,
    publish_timeout: Duration,
    backoff: Backoff,
    queue_expiry: Option<Duration>,
    ephemeral_expiry: Duration,
    max_event_size: MaxEventSize,
}

impl RabbitMqConfig {
    /// Settings for the broker at `url` (`amqp://user:password@host:port/vhost`; the
    /// default vhost `/` is written `%2f`), with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            queue_prefix: DEFAULT_QUEUE_PREFIX.to_owned(),
            connection_name: "orchestrator".to_owned(),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            backoff: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(3),
            },
            queue_expiry: None,
            ephemeral_expiry: Duration::from_secs(60),
            max_event_size: MaxEventSize::DEFAULT,
        }
    }

    /// The topic exchange events are published to (default `orchestrator.events`).
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The prefix of every queue name and of the dead-letter exchange (default
    /// `orchestrator`); see the [module docs](super) for the names derived from it.
    pub fn with_queue_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.queue_prefix = prefix.into();
        self
    }

    /// The connection name shown in the RabbitMQ management UI (default `orchestrator`;
    /// `-publish` and `-consume` are appended to the two connections).
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// How long [`connect`](super::RabbitMqTransport::connect) and a (re)subscription try to
    /// reach the broker before failing (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a publish (or a nack, a dead-letter, a dead-letter-queue call) waits for the
    /// broker — reconnecting while it is down — before failing with a temporary
    /// [`Error::Backend`] (default 30 s).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The reconnection backoff: the first retry after `min`, doubling up to `max`
    /// (default 100 ms to 3 s).
    pub fn with_reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff {
            min: min.max(Duration::from_millis(1)),
            max: max.max(min),
        };
        self
    }

    /// Deletes group and retry queues that have had no consumer and no use for this long
    /// (RabbitMQ's `x-expires`), messages included. Off by default: a group's queue keeps
    /// its events while the group is away. Meant for short-lived groups and tests. Every
    /// process using the same queues must use the same value (RabbitMQ refuses to
    /// re-declare a queue with other arguments).
    pub fn with_queue_expiry(mut self, expiry: Duration) -> Self {
        self.queue_expiry = Some(expiry);
        self
    }

    /// How long the queues of an ephemeral group outlive its consumer when its process dies
    /// without deleting them (RabbitMQ's `x-expires` on the group's work and retry queues;
    /// default 60 s). A consumer that stops normally deletes them at once. Must outlast a
    /// reconnection, during which the queue has no consumer.
    pub fn with_ephemeral_expiry(mut self, expiry: Duration) -> Self {
        self.ephemeral_expiry = expiry.max(Duration::from_millis(100));
        self
    }

    /// The largest event the transport publishes (default [`MaxEventSize::DEFAULT`]): a
    /// larger one is refused with [`Error::TooLarge`] before anything is published (a batch
    /// with one publishes nothing), and a larger message a subscription receives is
    /// dead-lettered undecoded. RabbitMQ refuses messages over its `max_message_size`
    /// (16 MiB by default), so a limit above that needs the broker's raised too.
    pub fn with_max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }

    /// The largest event published ([`with_max_event_size`](Self::with_max_event_size)).
    pub fn max_event_size(&self) -> MaxEventSize {
        self.max_event_size
    }

    /// The broker URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The topic exchange events are published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The prefix of the queue names.
    pub fn queue_prefix(&self) -> &str {
        &self.queue_prefix
    }

    /// The connection name.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// How long connecting may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How long a publish may wait for the broker.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// The queue expiry, if any.
    pub fn queue_expiry(&self) -> Option<Duration> {
        self.queue_expiry
    }

    /// The expiry of an ephemeral group's queues.
    pub fn ephemeral_expiry(&self) -> Duration {
        self.ephemeral_expiry
    }

    /// The durable queue of consumer group `group`: `<prefix>.group.<group>`.
    pub fn group_queue(&self, group: &str) -> String {
        format!("{}.group.{group}", self.queue_prefix)
    }

    /// The retry queue of `group` for delays up to `tier_ms` milliseconds:
    /// `<prefix>.retry.<group>.<tier_ms>ms`.
    pub fn retry_queue(&self, group: &str, tier_ms: u64) -> String {
        format!("{}.retry.{group}.{tier_ms}ms", self.queue_prefix)
    }

    /// The dead-letter exchange (fanout): `<prefix>.dead-letter`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.queue_prefix)
    }

    /// The dead-letter queue: `<prefix>.dead-letters`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letters", self.queue_prefix)
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// Checks the names: non-empty, and short enough that the longest derived queue name
    /// fits AMQP's 255 bytes.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.exchange.is_empty() {
            return Err(Error::invalid(
                "exchange",
                "must not be empty (the default exchange cannot route by topic)",
            ));
        }
        short("exchange", &self.exchange)?;
        if self.queue_prefix.is_empty() {
            return Err(Error::invalid("queue prefix", "must not be empty"));
        }
        short("dead-letter queue", &self.dead_letter_queue())?;
        Ok(())
    }
}

/// Settings of a [`RabbitMqEventStore`](super::RabbitMqEventStore).
///
/// ```
/// use orchestrator_backends::rabbitmq::RabbitMqStoreConfig;
///
/// let config = RabbitMqStoreConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .with_stream("shop.event-log");
/// assert_eq!(config.stream(), "shop.event-log");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqStoreConfig {
    url: String,
    stream: String,
    connection_name: String,
    connect_timeout: Duration,
    publish_timeout: Duration,
    backoff: Backoff,
    prefetch: u16,
    max_event_size: MaxEventSize,
}

impl RabbitMqStoreConfig {
    /// Settings for the broker at `url`, with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: DEFAULT_STREAM.to_owned(),
            connection_name: "orchestrator-store".to_owned(),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            backoff: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(3),
            },
            prefetch: 1000,
            max_event_size: MaxEventSize::DEFAULT,
        }
    }

    /// The stream queue holding the global log (default `orchestrator.event-log`).
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }

    /// The connection name shown in the RabbitMQ management UI.
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// How long connecting may take (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an append (or a read) waits for the broker before failing with a
    /// temporary [`Error::Backend`] (default 30 s).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The reconnection backoff (default 100 ms doubling to 3 s).
    pub fn with_reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff {
            min: min.max(Duration::from_millis(1)),
            max: max.max(min),
        };
        self
    }

    /// How many log records a reader may hold unacknowledged (RabbitMQ requires a prefetch
    /// to consume a stream; default 1000).
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The largest event an append writes (default [`MaxEventSize::DEFAULT`]): a batch with
    /// a larger one is refused with [`Error::TooLarge`] before anything of it is written.
    pub fn with_max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }

    /// The largest event an append writes ([`with_max_event_size`](Self::with_max_event_size)).
    pub fn max_event_size(&self) -> MaxEventSize {
        self.max_event_size
    }

    /// The broker URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The stream queue of the global log.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The connection name.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// How long connecting may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How long an append or a read may wait for the broker.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// The reader prefetch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.backoff
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.stream.is_empty() {
            return Err(Error::invalid("stream queue", "must not be empty"));
        }
        short("stream queue", &self.stream).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let c = RabbitMqConfig::new("amqp://x").with_queue_prefix("p");
        assert_eq!(c.group_queue("g.1"), "p.group.g.1");
        assert_eq!(c.retry_queue("g.1", 512), "p.retry.g.1.512ms");
        assert_eq!(c.dead_letter_exchange(), "p.dead-letter");
        assert_eq!(c.dead_letter_queue(), "p.dead-letters");
        assert!(c.validate().is_ok());
        assert!(c.clone().with_exchange("").validate().is_err());
        assert!(c.with_queue_prefix("x".repeat(250)).validate().is_err());
    }
}
