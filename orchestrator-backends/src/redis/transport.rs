//! [`RedisTransport`]: topics as Redis streams, consumer groups, retries and dead letters.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::Utc;
use orchestrator_core::transport::{validate_group, validate_topic};
use orchestrator_core::{
    DeadLetterQueue, DeliveryStream, Error, EventEnvelope, MaxEventSize, Result, SubscribeOptions,
    TopicPattern, Transport, cloudevents,
};
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::RedisConfig;
use super::conn::{Keys, delete_prefix, is_busy_group, parse_entries, with_retry};
use super::consumer;
use super::dlq::RedisDeadLetterQueue;
use super::trim::TrimClock;

/// A [`Transport`] on Redis Streams.
///
/// Each topic is the stream `<prefix>topic:<topic>`; each subscribing group is a Redis
/// consumer group on the streams of the topics its patterns match, plus a retry stream of its
/// own. See the [module docs](super) for the key layout, how patterns map, how nacks are
/// delayed and how messages of dead consumers are reclaimed.
///
/// ```no_run
/// use orchestrator_backends::redis::{RedisConfig, RedisTransport};
/// use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let transport = RedisTransport::connect(RedisConfig::new("redis://127.0.0.1:6379")?).await?;
/// let mut deliveries = transport.subscribe(SubscribeOptions::new("billing", "order.*")?).await?;
/// transport
///     .publish("order.placed", EventEnvelope::new("order.placed", &serde_json::json!({"id": 1}))?)
///     .await?;
/// if let Some(delivery) = deliveries.next().await? {
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisTransport {
    pub(crate) shared: Arc<Shared>,
}

/// What the transport, its consumers and their deliveries share.
pub(crate) struct Shared {
    pub(crate) manager: ConnectionManager,
    pub(crate) config: RedisConfig,
    pub(crate) keys: Keys,
    pub(crate) dlq: RedisDeadLetterQueue,
    known_topics: Mutex<HashSet<String>>,
    /// When each topic was last trimmed.
    pub(crate) trims: TrimClock,
    pub(crate) closed: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("url", &self.shared.config.redacted_url())
            .field("prefix", &self.shared.config.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisTransport {
    /// Connects to Redis. Commands go through a connection manager that reconnects on its
    /// own; each subscription opens a connection of its own for its blocking reads.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let manager = config.manager().await?;
        let keys = Keys::new(&config.prefix);
        let dlq = RedisDeadLetterQueue::with_manager(manager.clone(), config.clone());
        Ok(Self {
            shared: Arc::new(Shared {
                manager,
                config,
                keys,
                dlq,
                known_topics: Mutex::new(HashSet::new()),
                trims: TrimClock::default(),
                closed: watch::channel(false).0,
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// The dead-letter queue, as its concrete type.
    pub fn redis_dead_letter_queue(&self) -> &RedisDeadLetterQueue {
        &self.shared.dlq
    }

    /// Stops every subscription of this transport (their streams end with `Ok(None)`) and
    /// waits for their background tasks; later publishes and subscribes fail with
    /// [`Error::Closed`]. Deliveries already handed out can still be settled.
    pub async fn close(&self) {
        self.shared.closed.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for task in tasks {
            // A reader only ends by returning; a join error would be a panic, already reported.
            let _ = task.await;
        }
    }

    /// Deletes every key under this transport's prefix — topics, groups, retries, dead
    /// letters and anything else stored there. Returns how many keys were deleted. Meant for
    /// tests and teardown; close the transport first.
    pub async fn delete_all(&self) -> Result<usize> {
        lock(&self.shared.known_topics).clear();
        self.shared.trims.clear();
        delete_prefix(&mut self.shared.manager.clone(), &self.shared.config.prefix).await
    }

    fn ensure_open(&self) -> Result<()> {
        if *self.shared.closed.borrow() {
            return Err(Error::Closed {
                what: "redis transport".into(),
            });
        }
        Ok(())
    }

    /// Writes entries to a topic stream in one round trip. A retry after a connection error
    /// first looks at the stream's tail and skips the events the failed attempt did write.
    /// Then trims the stream if its trim interval has passed.
    async fn add_entries(&self, topic: &str, entries: &[(&str, &str, Vec<u8>)]) -> Result<()> {
        let shared = &self.shared;
        let key = shared.keys.topic(topic);
        let max_len = shared.config.topic_max_len;
        with_retry(&shared.config, "publish", |attempt| {
            let mut manager = shared.manager.clone();
            let key = key.clone();
            async move {
                let written = if attempt > 1 {
                    ids_in_tail(&mut manager, &key, entries.len()).await?
                } else {
                    HashSet::new()
                };
                let mut pipe = redis::pipe();
                for (event_type, id, json) in entries {
                    if written.contains(*id) {
                        continue;
                    }
                    let cmd = pipe.cmd("XADD").arg(&key);
                    if let Some(max_len) = max_len {
                        cmd.arg("MAXLEN").arg("~").arg(max_len);
                    }
                    cmd.arg("*")
                        .arg("type")
                        .arg(event_type)
                        .arg("event")
                        .arg(json.as_slice())
                        .ignore();
                }
                if pipe.is_empty() {
                    // The failed attempt had written everything.
                    return Ok(());
                }
                pipe.query_async::<()>(&mut manager).await
            }
        })
        .await?;
        self.trim_if_due(topic).await;
        Ok(())
    }

    /// Records `topic` in the topic registry; the first time it is seen anywhere, creates the
    /// consumer groups of every registered pattern that matches it, reading from the start of
    /// the (new) stream, so no event published to it is missed by a pattern subscription.
    pub(crate) async fn register_topic(&self, topic: &str) -> Result<()> {
        if lock(&self.shared.known_topics).contains(topic) {
            return Ok(());
        }
        let shared = &self.shared;
        let added: i64 = with_retry(&shared.config, "SADD", |_| {
            let mut manager = shared.manager.clone();
            async move {
                redis::cmd("SADD")
                    .arg(shared.keys.topics())
                    .arg(topic)
                    .query_async(&mut manager)
                    .await
            }
        })
        .await?;
        if added == 1 {
            let key = shared.keys.topic(topic);
            for (group, pattern) in self.registered_patterns().await? {
                if pattern.matches(topic) {
                    self.create_group(&key, &group, "0").await?;
                }
            }
            tracing::debug!(topic, "new topic registered");
        }
        lock(&shared.known_topics).insert(topic.to_owned());
        Ok(())
    }

    /// The members of the set at `key`.
    async fn members(&self, key: String) -> Result<Vec<String>> {
        let shared = &self.shared;
        with_retry(&shared.config, "SMEMBERS", |_| {
            let mut manager = shared.manager.clone();
            let key = &key;
            async move {
                redis::cmd("SMEMBERS")
                    .arg(key)
                    .query_async(&mut manager)
                    .await
            }
        })
        .await
    }

    async fn registered_patterns(&self) -> Result<Vec<(String, TopicPattern)>> {
        let members = self.members(self.shared.keys.patterns()).await?;
        Ok(members
            .iter()
            .filter_map(|m| {
                let (group, pattern) = m.split_once(' ')?;
                Some((group.to_owned(), TopicPattern::parse(pattern).ok()?))
            })
            .collect())
    }

    /// The registered topics.
    pub(crate) async fn topics(&self) -> Result<Vec<String>> {
        self.members(self.shared.keys.topics()).await
    }

    /// `XGROUP CREATE key group start MKSTREAM`; an existing group is left as it is.
    pub(crate) async fn create_group(&self, key: &str, group: &str, start: &str) -> Result<()> {
        let shared = &self.shared;
        with_retry(&shared.config, "XGROUP CREATE", |_| {
            let mut manager = shared.manager.clone();
            async move {
                let created: std::result::Result<Value, RedisError> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(key)
                    .arg(group)
                    .arg(start)
                    .arg("MKSTREAM")
                    .query_async(&mut manager)
                    .await;
                match created {
                    Err(e) if is_busy_group(&e) => Ok(()),
                    other => other.map(drop),
                }
            }
        })
        .await
    }

    /// Registers `group` as ephemeral and marks its consumer alive; first removes the
    /// ephemeral groups whose consumer is gone (their alive key expired).
    async fn register_ephemeral(&self, group: &str) -> Result<()> {
        let removed = self.sweep_ephemeral().await?;
        if removed > 0 {
            tracing::info!(removed, "removed ephemeral groups whose consumer is gone");
        }
        let shared = &self.shared;
        with_retry(&shared.config, "SADD", |_| {
            let mut manager = shared.manager.clone();
            async move {
                redis::cmd("SADD")
                    .arg(shared.keys.ephemeral())
                    .arg(group)
                    .query_async::<()>(&mut manager)
                    .await
            }
        })
        .await?;
        self.keep_alive(group).await
    }

    /// Renews an ephemeral group's alive key.
    pub(crate) async fn keep_alive(&self, group: &str) -> Result<()> {
        let shared = &self.shared;
        let ttl = u64::try_from(shared.config.ephemeral_timeout.as_millis()).unwrap_or(u64::MAX);
        with_retry(&shared.config, "SET", |_| {
            let mut manager = shared.manager.clone();
            async move {
                redis::cmd("SET")
                    .arg(shared.keys.alive(group))
                    .arg(1)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut manager)
                    .await
            }
        })
        .await
    }

    /// Removes the ephemeral groups whose consumer is gone; returns how many.
    pub(crate) async fn sweep_ephemeral(&self) -> Result<usize> {
        let shared = &self.shared;
        let groups = self.members(shared.keys.ephemeral()).await?;
        if groups.is_empty() {
            return Ok(0);
        }
        let alive: Vec<bool> = with_retry(&shared.config, "EXISTS", |_| {
            let mut manager = shared.manager.clone();
            let mut pipe = redis::pipe();
            for group in &groups {
                pipe.cmd("EXISTS").arg(shared.keys.alive(group));
            }
            async move { pipe.query_async(&mut manager).await }
        })
        .await?;
        let mut removed = 0;
        for (group, alive) in groups.iter().zip(alive) {
            if !alive {
                self.remove_group(group).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes everything the transport keeps for `group`: its patterns, its consumer group
    /// on every topic stream, its retry stream and delayed set (their events included).
    pub(crate) async fn remove_group(&self, group: &str) -> Result<()> {
        let shared = &self.shared;
        let prefix = format!("{group} ");
        let patterns = self.members(shared.keys.patterns()).await?;
        let patterns: Vec<&String> = patterns.iter().filter(|m| m.starts_with(&prefix)).collect();
        if !patterns.is_empty() {
            // First, so that a topic registered from now on does not get the group again.
            with_retry(&shared.config, "SREM", |_| {
                let mut manager = shared.manager.clone();
                let patterns = &patterns;
                async move {
                    redis::cmd("SREM")
                        .arg(shared.keys.patterns())
                        .arg(patterns)
                        .query_async::<()>(&mut manager)
                        .await
                }
            })
            .await?;
        }
        let mut keys: Vec<String> = self
            .topics()
            .await?
            .iter()
            .map(|t| shared.keys.topic(t))
            .collect();
        keys.push(shared.keys.retry(group));
        keys.push(shared.keys.delayed(group));
        keys.push(shared.keys.alive(group));
        keys.push(shared.keys.ephemeral());
        with_retry(&shared.config, "remove group", |_| {
            let mut manager = shared.manager.clone();
            let mut invocation = super::scripts::REMOVE_GROUP.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            invocation.arg(group);
            async move { invocation.invoke_async::<()>(&mut manager).await }
        })
        .await?;
        tracing::debug!(group, "ephemeral group removed");
        Ok(())
    }

    pub(crate) fn track(&self, task: JoinHandle<()>) {
        let mut tasks = lock(&self.shared.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain inserts and
/// removals), so a poisoned lock is used as is.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The event ids among the last entries of a topic stream (for retries of publishes).
async fn ids_in_tail(
    manager: &mut ConnectionManager,
    key: &str,
    batch: usize,
) -> std::result::Result<HashSet<String>, RedisError> {
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(batch.saturating_mul(2).max(1000))
        .query_async(manager)
        .await?;
    let entries = parse_entries(reply).unwrap_or_default();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let value: serde_json::Value = serde_json::from_slice(e.field("event")?).ok()?;
            Some(value.get("id")?.as_str()?.to_owned())
        })
        .collect())
}

/// An event as a topic entry: its type, its id (to recognise it on a retry) and its JSON,
/// refused if the JSON is over `limit`.
fn encode_for_topic(event: &EventEnvelope, limit: MaxEventSize) -> Result<(&str, &str, Vec<u8>)> {
    let json = cloudevents::encode(event)?;
    limit.check_len(json.len())?;
    Ok((event.event_type(), event.id().as_str(), json))
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_topic(topic)?;
        self.ensure_open()?;
        let entry = encode_for_topic(&event, self.shared.config.max_event_size)?;
        self.register_topic(topic).await?;
        self.add_entries(topic, std::slice::from_ref(&entry))
            .await?;
        tracing::trace!(topic, event = %event.id(), "published");
        Ok(())
    }

    /// One pipeline of `XADD`s: one round trip for the whole batch.
    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        validate_topic(topic)?;
        self.ensure_open()?;
        if events.is_empty() {
            return Ok(());
        }
        let entries = events
            .iter()
            .map(|event| encode_for_topic(event, self.shared.config.max_event_size))
            .collect::<Result<Vec<_>>>()?;
        self.register_topic(topic).await?;
        self.add_entries(topic, &entries).await?;
        tracing::trace!(topic, events = entries.len(), "published a batch");
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>> {
        validate_group(&options.group)?;
        if options.patterns.is_empty() {
            return Err(Error::invalid(
                "subscription",
                "has no topic pattern; add one such as \"order.*\"",
            ));
        }
        self.ensure_open()?;
        let shared = &self.shared;
        let group = options.group.as_str();
        if options.ephemeral {
            self.register_ephemeral(group).await?;
        }
        let members: Vec<String> = options
            .patterns
            .iter()
            .map(|p| format!("{group} {}", p.as_str()))
            .collect();
        with_retry(&shared.config, "SADD", |_| {
            let mut manager = shared.manager.clone();
            let members = &members;
            async move {
                redis::cmd("SADD")
                    .arg(shared.keys.patterns())
                    .arg(members)
                    .query_async::<()>(&mut manager)
                    .await
            }
        })
        .await?;
        let retry_key = shared.keys.retry(group);
        self.create_group(&retry_key, group, "0").await?;
        let mut topics: Vec<String> = Vec::new();
        for pattern in options.patterns.iter().filter(|p| p.is_exact()) {
            self.register_topic(pattern.as_str()).await?;
            topics.push(pattern.as_str().to_owned());
        }
        if options.patterns.iter().any(|p| !p.is_exact()) {
            topics.extend(
                self.topics()
                    .await?
                    .into_iter()
                    .filter(|t| options.matches(t)),
            );
        }
        let mut streams = vec![retry_key];
        let mut seen = HashSet::new();
        for topic in topics {
            if seen.insert(topic.clone()) {
                let key = shared.keys.topic(&topic);
                self.create_group(&key, group, "$").await?;
                streams.push(key);
            }
        }
        let deliveries = consumer::start(self, options, streams).await?;
        Ok(Box::new(deliveries))
    }

    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_group(group)?;
        validate_topic(topic)?;
        self.ensure_open()?;
        let shared = &self.shared;
        let key = shared.keys.retry(group);
        self.create_group(&key, group, "0").await?;
        let json = cloudevents::encode(&event)?;
        shared.config.max_event_size.check_len(json.len())?;
        let first = Utc::now().timestamp_millis().to_string();
        let fields: [(&str, &[u8]); 6] = [
            ("type", event.event_type().as_bytes()),
            ("event", json.as_slice()),
            ("topic", topic.as_bytes()),
            ("attempt", b"1"),
            ("first", first.as_bytes()),
            ("error", b""),
        ];
        with_retry(&shared.config, "redeliver", |_| {
            let mut manager = shared.manager.clone();
            let (key, fields) = (&key, &fields);
            async move {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(key).arg("*");
                for (name, value) in fields.iter() {
                    cmd.arg(*name).arg(*value);
                }
                cmd.query_async::<Value>(&mut manager).await
            }
        })
        .await?;
        tracing::debug!(group, topic, event = %event.id(), "redelivering");
        Ok(())
    }

    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        Arc::new(self.shared.dlq.clone())
    }
}
