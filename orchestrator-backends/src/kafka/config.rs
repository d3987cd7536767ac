//! Where the Kafka cluster is and how the backend behaves: [`KafkaConfig`].

use std::collections::BTreeMap;
use std::time::Duration;

use orchestrator_core::{MaxEventSize, Result};
use rdkafka::ClientConfig;

use super::names;

/// The topic prefix used when none is configured: none (topics are named as event types).
pub const DEFAULT_PREFIX: &str = "";

/// The default session timeout of the lease consumers
/// ([`KafkaConfig::with_lease_session_timeout`]).
pub const DEFAULT_LEASE_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How to reach the Kafka cluster and how the backend behaves.
///
/// Building a config checks its values; nothing connects until
/// [`KafkaTransport::connect`](super::KafkaTransport::connect),
/// [`KafkaEventStore::connect`](super::KafkaEventStore::connect) or
/// [`KafkaDeadLetterQueue::connect`](super::KafkaDeadLetterQueue::connect).
///
/// Any librdkafka property can be passed through with [`with_property`](Self::with_property)
/// (every client), [`with_producer_property`](Self::with_producer_property) or
/// [`with_consumer_property`](Self::with_consumer_property): TLS and SASL settings,
/// `client.id`, `compression.type`, … (see the [module docs](super) for TLS and SASL).
///
/// ```
/// use std::time::Duration;
/// use orchestrator_backends::kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .with_prefix("shop.")?
///     .with_partitions(6)
///     .with_property("security.protocol", "sasl_ssl")
///     .with_property("sasl.mechanism", "SCRAM-SHA-512")
///     .with_property("sasl.username", "shop")
///     .with_property("sasl.password", "s3cret")
///     .with_metadata_refresh_interval(Duration::from_secs(2));
/// assert_eq!(config.prefix(), "shop.");
/// // Secrets never show in logs or debug output.
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), orchestrator_core::Error>(())
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) brokers: String,
    pub(crate) prefix: String,
    pub(crate) partitions: i32,
    pub(crate) replication_factor: i32,
    pub(crate) create_topics: bool,
    pub(crate) finite_store_retention: bool,
    pub(crate) properties: BTreeMap<String, String>,
    pub(crate) producer_properties: BTreeMap<String, String>,
    pub(crate) consumer_properties: BTreeMap<String, String>,
    pub(crate) metadata_refresh_interval: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) fetch_wait: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) subscribe_timeout: Duration,
    pub(crate) max_delayed: usize,
    pub(crate) store_topic: Option<String>,
    pub(crate) lease_session_timeout: Duration,
    pub(crate) max_event_size: MaxEventSize,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("create_topics", &self.create_topics)
            .field("properties", &redacted(&self.properties))
            .field("producer_properties", &redacted(&self.producer_properties))
            .field("consumer_properties", &redacted(&self.consumer_properties))
            .field("metadata_refresh_interval", &self.metadata_refresh_interval)
            .field("commit_interval", &self.commit_interval)
            .field("fetch_wait", &self.fetch_wait)
            .field("operation_timeout", &self.operation_timeout)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .field("max_delayed", &self.max_delayed)
            .field("store_topic", &self.store_topic())
            .field("lease_session_timeout", &self.lease_session_timeout)
            .field("max_event_size", &self.max_event_size)
            .finish()
    }
}

/// Property values whose names suggest a secret are shown as `***`.
fn redacted(properties: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    properties
        .iter()
        .map(|(k, v)| {
            let secret = super::url::is_secret_key(k);
            (k.as_str(), if secret { "***" } else { v.as_str() })
        })
        .collect()
}

impl KafkaConfig {
    /// A config for the cluster reached through `brokers` (`host:port[,host:port…]`, librdkafka's
    /// `bootstrap.servers`), with every other setting at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            partitions: 3,
            replication_factor: 1,
            create_topics: true,
            finite_store_retention: false,
            properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            metadata_refresh_interval: Duration::from_secs(5),
            commit_interval: Duration::from_secs(1),
            fetch_wait: Duration::from_millis(100),
            operation_timeout: Duration::from_secs(30),
            subscribe_timeout: Duration::from_secs(60),
            max_delayed: 10_000,
            store_topic: None,
            lease_session_timeout: DEFAULT_LEASE_SESSION_TIMEOUT,
            max_event_size: MaxEventSize::DEFAULT,
        }
    }

    /// Puts every topic and consumer group under `prefix` (default none), so that several
    /// applications or tests share one cluster without seeing each other's events. Only the
    /// characters Kafka allows in topic names: ASCII letters, digits, `.`, `_` and `-`; end it
    /// with a `.` to keep topic names readable (`shop.order.placed`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        names::validate_prefix(&prefix)?;
        self.prefix = prefix;
        Ok(self)
    }

    /// How many partitions the topics this backend creates get (default 3; at least 1).
    /// Events of one key (stream id, else event id) always go to one partition, in order;
    /// partitions are the unit of parallelism within a consumer group. The store's log and the
    /// dead-letter topic always have one partition.
    pub fn with_partitions(mut self, partitions: u16) -> Self {
        self.partitions = i32::from(partitions.max(1));
        self
    }

    /// The replication factor of the topics this backend creates (default 1, for single-broker
    /// development clusters; use 3 in production).
    pub fn with_replication_factor(mut self, replication_factor: u16) -> Self {
        self.replication_factor = i32::from(replication_factor.max(1));
        self
    }

    /// Whether missing topics are created through the admin API (default `true`). Turn it off
    /// where topics are provisioned separately; publishing to or subscribing to a missing
    /// topic then fails (subscriptions by pattern simply wait for matching topics).
    pub fn with_create_topics(mut self, create: bool) -> Self {
        self.create_topics = create;
        self
    }

    /// Lets the event store use a log topic whose retention is finite (`retention.ms` or
    /// `retention.bytes` other than -1, or a `compact` cleanup policy). Off by default:
    /// stream versions are ranks in the log, so when the broker deletes old records, events
    /// vanish and the rest are renumbered, and compaction keeps one event per stream. The
    /// store creates its topic with infinite retention; with this off, opening a store on a
    /// topic provisioned otherwise fails with `Error::InvalidInput` naming the settings to
    /// change. Turn it on only if you archive the log elsewhere and accept the renumbering.
    pub fn with_finite_store_retention(mut self, allow: bool) -> Self {
        self.finite_store_retention = allow;
        self
    }

    /// Sets a librdkafka property on every client (producer, consumers, admin): TLS
    /// (`security.protocol`, `ssl.ca.location`, …), SASL (`sasl.mechanism`, `sasl.username`,
    /// …), `client.id`, and so on. Applied after the backend's own settings, so it can also
    /// override them (at your own risk: the backend relies on `enable.idempotence`,
    /// `enable.auto.offset.store=false` and `auto.offset.reset=earliest`).
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Sets a librdkafka property on the producer only (`linger.ms`, `compression.type`, …).
    pub fn with_producer_property(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.producer_properties.insert(key.into(), value.into());
        self
    }

    /// Sets a librdkafka property on the consumers only (`session.timeout.ms`, …).
    pub fn with_consumer_property(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.consumer_properties.insert(key.into(), value.into());
        self
    }

    /// How often consumers re-read the cluster's topic list (librdkafka's
    /// `topic.metadata.refresh.interval.ms`; default 5 s). A pattern subscription sees a
    /// topic created by another process only then; topics created by this process are seen
    /// at once. Events published meanwhile are not lost: a new topic is read from its start.
    pub fn with_metadata_refresh_interval(mut self, interval: Duration) -> Self {
        self.metadata_refresh_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How often settled offsets are committed (librdkafka's `auto.commit.interval.ms`;
    /// default 1 s). A consumer that dies redelivers what it settled since the last commit.
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long the broker may hold a fetch for more data (`fetch.wait.max.ms`; default
    /// 100 ms): the latency of a quiet topic against the number of fetch round trips.
    pub fn with_fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// How long an admin or metadata request, or a read of a log up to its end, may take
    /// (default 30 s).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// How long [`subscribe`](orchestrator_core::Transport::subscribe) waits for the
    /// consumer group to hand the new consumer its partitions (default 60 s).
    pub fn with_subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// How many nacked messages a consumer holds while their delay runs before it pauses its
    /// group's retry topic (default 10 000): bounds memory under a flood of long delays.
    pub fn with_max_delayed(mut self, max: usize) -> Self {
        self.max_delayed = max.max(1);
        self
    }

    /// The event store's log topic (default `<prefix>__orchestrator.events`).
    pub fn with_store_topic(mut self, topic: impl Into<String>) -> Result<Self> {
        let topic = topic.into();
        names::validate_kafka_topic(&topic)?;
        self.store_topic = Some(topic);
        Ok(self)
    }

    /// The session timeout of the consumers that hold the store's leases
    /// ([`KafkaLease`](super::KafkaLease); librdkafka's `session.timeout.ms` for them alone;
    /// default 6 s, at least 1 s): when a holder's process dies without leaving the group,
    /// the group coordinator hands the lease to a standby once this much time has passed
    /// without a heartbeat from it. It is also the lease's [`ttl`](orchestrator_core::Lease::ttl),
    /// so holders renew, and standbys look, every third of it. The broker must allow it:
    /// Apache Kafka refuses session timeouts below its `group.min.session.timeout.ms`
    /// (6 s by default).
    pub fn with_lease_session_timeout(mut self, timeout: Duration) -> Self {
        self.lease_session_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// The largest event the store and the transport produce (default
    /// [`MaxEventSize::DEFAULT`], 900 KiB, under Kafka's 1 MB default message size): a larger
    /// one is refused with [`Error::TooLarge`](orchestrator_core::Error::TooLarge) before
    /// anything is produced (a batch with one produces nothing), and a larger message a
    /// subscription receives is dead-lettered undecoded. Raising it past 1 MB needs the
    /// topics' `max.message.bytes` and the producer's `message.max.bytes` raised to match
    /// ([`with_producer_property`](Self::with_producer_property)).
    pub fn with_max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }

    /// The lease consumers' session timeout ([`with_lease_session_timeout`](Self::with_lease_session_timeout)).
    pub fn lease_session_timeout(&self) -> Duration {
        self.lease_session_timeout
    }

    /// The value of a property set for every client ([`with_property`](Self::with_property)
    /// or a `kafka://` URL's query).
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// The bootstrap brokers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The topic and group prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The event store's log topic.
    pub fn store_topic(&self) -> String {
        self.store_topic
            .clone()
            .unwrap_or_else(|| names::internal(&self.prefix, "events"))
    }

    /// The librdkafka settings every client starts from.
    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set(
                "topic.metadata.refresh.interval.ms",
                millis(self.metadata_refresh_interval),
            )
            // librdkafka logs through `log`, which nothing here listens to; errors reach us
            // as results.
            .set("log_level", "3");
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    /// The producer's settings: idempotent (acks=all, ordered retries).
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "300000");
        for (k, v) in self.properties.iter().chain(&self.producer_properties) {
            config.set(k, v);
        }
        config
    }

    /// A group consumer's settings: offsets stored only for settled deliveries and committed
    /// every commit interval; new groups start at the earliest offset.
    pub(crate) fn group_consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", millis(self.commit_interval))
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", millis(self.fetch_wait))
            .set("enable.partition.eof", "false");
        self.consumer_overrides(&mut config);
        config
    }

    /// An ephemeral group consumer's settings: a group consumer's, but offsets are never
    /// committed, so the group leaves nothing on the broker once its consumer is gone (the
    /// subscription places each partition itself: see `consumer::Ephemeral`).
    pub(crate) fn ephemeral_consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.group_consumer(group_id);
        config.set("enable.auto.commit", "false");
        config
    }

    /// A reader's settings: no group (partitions are assigned by hand), end of partition
    /// reported, short fetch waits so that reaching the end is quick.
    pub(crate) fn reader(&self, eof: bool) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", format!("{}__orchestrator.reader", self.prefix))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                millis(self.fetch_wait.min(Duration::from_millis(20))),
            )
            .set("enable.partition.eof", if eof { "true" } else { "false" });
        self.consumer_overrides(&mut config);
        config
    }

    /// A lease candidate's settings: a group consumer that never commits on its own (its
    /// renewals commit by hand), with the lease's session timeout, heartbeats at most a
    /// second apart (a standby hears of a rebalance at its next heartbeat), and the
    /// cooperative-sticky assignor (a member joining never takes the partition from its
    /// holder). Set after the pass-through properties: the lease relies on them.
    pub(crate) fn lease_consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.base();
        self.consumer_overrides(&mut config);
        let session = self.lease_session_timeout;
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", millis(session))
            .set(
                "heartbeat.interval.ms",
                millis((session / 3).min(Duration::from_secs(1))),
            )
            // A process whose async threads are wedged stops polling: it leaves the group
            // (and the lease goes) after three session timeouts rather than librdkafka's
            // default five minutes.
            .set("max.poll.interval.ms", millis(session * 3))
            .set("enable.partition.eof", "false");
        config
    }

    fn consumer_overrides(&self, config: &mut ClientConfig) {
        for (k, v) in self.properties.iter().chain(&self.consumer_properties) {
            config.set(k, v);
        }
    }

    /// The admin client's settings.
    pub(crate) fn admin(&self) -> ClientConfig {
        self.base()
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_core::Error;

    #[test]
    fn secrets_are_redacted() {
        let config = KafkaConfig::new("b:9092")
            .with_property("sasl.password", "pw1")
            .with_property("ssl.key.pem", "pem-data")
            .with_producer_property("linger.ms", "7");
        let text = format!("{config:?}");
        assert!(
            !text.contains("pw1") && !text.contains("pem-data"),
            "{text}"
        );
        assert!(text.contains("linger.ms") && text.contains('7'), "{text}");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(KafkaConfig::new("b").with_prefix("ok.prefix-1_").is_ok());
        assert!(matches!(
            KafkaConfig::new("b").with_prefix("bad prefix"),
            Err(Error::InvalidInput { .. })
        ));
        assert_eq!(
            KafkaConfig::new("b")
                .with_prefix("p.")
                .unwrap()
                .store_topic(),
            "p.__orchestrator.events"
        );
    }

    #[test]
    fn pass_through_properties_win() {
        let config = KafkaConfig::new("b").with_property("client.id", "me");
        assert_eq!(config.producer().get("client.id"), Some("me"));
        assert_eq!(
            config.group_consumer("g").get("enable.auto.offset.store"),
            Some("false")
        );
    }
}
