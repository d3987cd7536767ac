//! [`KafkaTransport`]: publishing to topics, consumer groups subscribing by pattern.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use async_trait::async_trait;
use chrono::Utc;
use orchestrator_core::transport::{validate_group, validate_topic};
use orchestrator_core::{
    DeadLetterQueue, DeliveryStream, Error, EventEnvelope, Result, SubscribeOptions, Transport,
    cloudevents,
};
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::client::{BACKEND, TopicKind, Topics, blocking, failure, kafka_error, producer, send};
use super::config::KafkaConfig;
use super::consumer::{Context, Ephemeral, GroupConsumer, Role, Subscription, pump};
use super::delivery::KafkaDeliveryStream;
use super::dlq::KafkaDeadLetterQueue;
use super::live;
use super::names;
use super::wire::{self, RetryInfo};

/// A transport on Kafka (feature `kafka`): a topic per event topic, a consumer group per
/// subscribing group, retries and dead letters in topics of their own.
///
/// See the [module docs](super) for names, keys, offsets, retries and dead letters.
/// Clones share one producer.
#[derive(Clone)]
pub struct KafkaTransport {
    shared: Arc<Shared>,
}

/// What the transport, its subscriptions and their deliveries share.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    producer: FutureProducer,
    topics: Topics,
    pub(crate) dlq: KafkaDeadLetterQueue,
    /// Live pattern subscriptions, told to look for new topics when this process creates one.
    watchers: Mutex<Vec<Weak<GroupConsumer>>>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("brokers", &self.shared.config.brokers)
            .field("prefix", &self.shared.config.prefix)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Produces `event` to a group's retry topic with its retry story.
    pub(crate) async fn send_retry(
        &self,
        retry_topic: &str,
        event: &EventEnvelope,
        info: &RetryInfo,
    ) -> Result<()> {
        let value = cloudevents::encode(event)?;
        let key = event.partition_key();
        let record = FutureRecord::to(retry_topic)
            .key(key.as_bytes())
            .payload(&value[..])
            .headers(wire::retry_headers(event, info));
        send(&self.producer, record).await.map(|_| ())
    }

    /// Makes sure an event topic exists; tells pattern subscriptions when it is new.
    async fn ensure_topic(&self, kafka_topic: &str) -> Result<()> {
        if self.topics.is_known(kafka_topic) {
            return Ok(());
        }
        let created = self
            .topics
            .ensure(&[kafka_topic], TopicKind::Partitioned)
            .await?;
        if !created.is_empty() {
            self.wake_watchers();
        }
        Ok(())
    }

    /// Asks every live pattern subscription of this process for fresh cluster metadata, so
    /// that it joins the topics just created without waiting for the refresh interval.
    fn wake_watchers(&self) {
        let live: Vec<Arc<GroupConsumer>> = {
            let mut watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
            watchers.retain(|w| w.strong_count() > 0);
            watchers.iter().filter_map(Weak::upgrade).collect()
        };
        if live.is_empty() {
            return;
        }
        let timeout = self.config.operation_timeout;
        tokio::task::spawn_blocking(move || {
            for consumer in live {
                if let Err(error) = consumer.fetch_metadata(None, timeout) {
                    tracing::debug!(%error, "refreshing a pattern subscription's metadata failed");
                }
            }
        });
    }
}

impl KafkaTransport {
    /// Connects to the cluster: creates the producer and makes sure the dead-letter topic
    /// exists (which also checks that the cluster answers).
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let topics = Topics::new(&config)?;
        let producer = producer(&config)?;
        let dlq = KafkaDeadLetterQueue::with_parts(&config, producer.clone(), &topics).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                producer,
                topics,
                dlq,
                watchers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }

    /// The dead-letter queue, as its own type.
    pub fn kafka_dead_letter_queue(&self) -> KafkaDeadLetterQueue {
        self.shared.dlq.clone()
    }

    /// The Kafka topic that carries event topic `topic` (`<prefix><escaped topic>`).
    pub fn kafka_topic(&self, topic: &str) -> Result<String> {
        validate_topic(topic)?;
        names::event_topic(&self.shared.config.prefix, topic)
    }

    /// Deletes every topic under the configured prefix — event, retry, dead-letter and
    /// store topics alike (for tests and tear-down), once this process's subscriptions under
    /// the prefix have closed (waiting at most the operation timeout) and the dead-letter
    /// queue's reader is closed. Refused without a prefix, which would mean every topic of
    /// the cluster.
    pub async fn delete_all_topics(&self) -> Result<()> {
        let prefix = &self.shared.config.prefix;
        if prefix.is_empty() {
            return Err(Error::invalid(
                "Kafka topic prefix",
                "delete_all_topics needs a prefix; without one it would delete every topic",
            ));
        }
        live::wait_closed(prefix, self.shared.config.operation_timeout).await;
        // The dead-letter queue's reader fetches its topic too.
        self.shared.dlq.close_reader().await;
        let topics = self.shared.topics.list(prefix).await?;
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.shared.topics.delete(&refs).await
    }

    /// The existing Kafka topics whose event topic matches one of the subscription's
    /// patterns.
    async fn matching_topics(&self, options: &SubscribeOptions) -> Result<Vec<String>> {
        let prefix = &self.shared.config.prefix;
        let topics = self.shared.topics.list(prefix).await?;
        Ok(topics
            .into_iter()
            .filter(|t| names::logical_topic(prefix, t).is_some_and(|t| options.matches(&t)))
            .collect())
    }

    /// Records the current end offset of every partition of `topics` as where the
    /// ephemeral group starts reading it.
    async fn place_at_end(
        &self,
        consumer: &Arc<GroupConsumer>,
        ephemeral: &Ephemeral,
        topics: Vec<String>,
    ) -> Result<()> {
        let timeout = self.shared.config.operation_timeout;
        for topic in topics {
            let partitions = self.shared.topics.partitions(&topic).await?;
            for partition in 0..partitions {
                let (consumer, name) = (Arc::clone(consumer), topic.clone());
                let (_, high) = blocking(move || {
                    consumer
                        .fetch_watermarks(&name, partition, timeout)
                        .map_err(kafka_error)
                })
                .await?;
                ephemeral.set(&topic, partition, high);
            }
        }
        Ok(())
    }

    /// Queues one event for `kafka_topic`; `partition` overrides the key's partition.
    fn queue(
        &self,
        kafka_topic: &str,
        event: &EventEnvelope,
        partition: Option<i32>,
    ) -> Result<std::result::Result<DeliveryFuture, KafkaError>> {
        let value = cloudevents::encode(event)?;
        self.shared.config.max_event_size.check_len(value.len())?;
        let key = event.partition_key();
        let mut record = FutureRecord::to(kafka_topic)
            .key(key.as_bytes())
            .payload(&value[..])
            .headers(wire::event_headers(event));
        if let Some(p) = partition {
            record = record.partition(p);
        }
        Ok(self.shared.producer.send_result(record).map_err(|(e, _)| e))
    }
}

/// Waits for a delivery report.
async fn delivered(future: DeliveryFuture) -> Result<()> {
    future
        .await
        .map_err(|_| failure(true, "the Kafka producer was dropped"))?
        .map(|_| ())
        .map_err(|(e, _)| kafka_error(e))
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        let kafka_topic = self.kafka_topic(topic)?;
        let value = cloudevents::encode(&event)?;
        self.shared.config.max_event_size.check_len(value.len())?;
        self.shared.ensure_topic(&kafka_topic).await?;
        let key = event.partition_key();
        let record = FutureRecord::to(&kafka_topic)
            .key(key.as_bytes())
            .payload(&value[..])
            .headers(wire::event_headers(&event));
        send(&self.shared.producer, record).await.map(|_| ())
    }

    /// Sends every event, then awaits every delivery report. Events with a stream id go to
    /// their key's partition; the others all go to one partition chosen for the batch, so
    /// that they are delivered in batch order.
    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        let kafka_topic = self.kafka_topic(topic)?;
        if events.is_empty() {
            return Ok(());
        }
        // All refused before one is sent: a batch with an event over the limit sends nothing.
        for event in &events {
            self.shared.config.max_event_size.check(event)?;
        }
        self.shared.ensure_topic(&kafka_topic).await?;
        let keyless = match events.iter().find(|e| e.stream_id().is_none()) {
            Some(first) => {
                let partitions = self.shared.topics.partitions(&kafka_topic).await?;
                // Any partition will do (the keys are random event ids): spread batches.
                let hash = std::collections::hash_map::RandomState::new().hash_one(first.id());
                let n = u64::try_from(partitions.max(1)).unwrap_or(1);
                i32::try_from(hash % n).ok()
            }
            None => None,
        };
        let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::with_capacity(events.len());
        for event in &events {
            let partition = if event.stream_id().is_none() {
                keyless
            } else {
                None
            };
            loop {
                match self.queue(&kafka_topic, event, partition)? {
                    Ok(future) => {
                        in_flight.push_back(future);
                        break;
                    }
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                        // librdkafka's queue is full: wait for the oldest report to make room.
                        match in_flight.pop_front() {
                            Some(oldest) => delivered(oldest).await?,
                            None => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                        }
                    }
                    Err(e) => return Err(kafka_error(e)),
                }
            }
        }
        let mut first_error = None;
        for future in in_flight {
            if let Err(e) = delivered(future).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>> {
        validate_group(&options.group)?;
        if options.patterns.is_empty() {
            return Err(Error::invalid(
                "subscription",
                "no topic patterns; subscribe to at least one (`#` for every topic)",
            ));
        }
        let config = &self.shared.config;
        let mut subscriptions = Vec::with_capacity(options.patterns.len() + 1);
        let mut exact = Vec::new();
        let mut by_pattern = false;
        for pattern in &options.patterns {
            let name = names::subscription(&config.prefix, pattern)?;
            if pattern.is_exact() {
                exact.push(name.clone());
            } else {
                by_pattern = true;
            }
            subscriptions.push(name);
        }
        let retry_topic = if options.ephemeral {
            names::ephemeral_retry_topic(&config.prefix)
        } else {
            names::retry_topic(&config.prefix, &options.group)?
        };
        if config.create_topics {
            let refs: Vec<&str> = exact.iter().map(String::as_str).collect();
            self.shared
                .topics
                .ensure(&refs, TopicKind::Partitioned)
                .await?;
        }
        self.shared
            .topics
            .ensure(&[&retry_topic], TopicKind::Partitioned)
            .await?;

        let sub = Arc::new(Subscription::new(
            Arc::clone(&self.shared),
            options.group.clone(),
            retry_topic.clone(),
            options.ephemeral,
        ));
        // Two consumers: the event topics' partitions are shared among the group's consumers
        // by themselves, the retry topic's in a group of its own, so that a retry topic never
        // takes a consumer's share of the events. An ephemeral group's consumers commit
        // nothing and start at the current end of every partition.
        let group_id = names::group_id(&config.prefix, &options.group);
        let retries_group = if options.ephemeral {
            format!("{group_id}.retries")
        } else {
            retry_topic.clone()
        };
        let settings = |id: &str| {
            if options.ephemeral {
                config.ephemeral_consumer(id)
            } else {
                config.group_consumer(id)
            }
        };
        let consumer: GroupConsumer = settings(&group_id)
            .create_with_context(Context::new(Arc::clone(&sub), Role::Events))
            .map_err(kafka_error)?;
        let retries: GroupConsumer = settings(&retries_group)
            .create_with_context(Context::new(Arc::clone(&sub), Role::Retries))
            .map_err(kafka_error)?;
        let consumer = Arc::new(consumer);
        // The existing topics the patterns match: where an ephemeral group starts, and
        // whether there is an assignment to wait for (exact topics exist by now).
        let matching = if sub.ephemeral.is_some() || exact.is_empty() {
            self.matching_topics(&options).await?
        } else {
            Vec::new()
        };
        if let Some(ephemeral) = &sub.ephemeral {
            let mut topics = vec![retry_topic.clone()];
            topics.extend(matching.iter().cloned());
            self.place_at_end(&consumer, ephemeral, topics).await?;
        }
        let refs: Vec<&str> = subscriptions.iter().map(String::as_str).collect();
        consumer.subscribe(&refs).map_err(kafka_error)?;
        retries.subscribe(&[&retry_topic]).map_err(kafka_error)?;
        if by_pattern {
            self.shared
                .watchers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::downgrade(&consumer));
        }
        let prefetch = options.prefetch.max(1);
        let (tx, rx) = mpsc::channel(prefetch);
        tokio::spawn(pump(Arc::clone(&sub), consumer, Arc::new(retries), tx));
        // librdkafka joins the group only once some topic matches; until one does there is
        // nothing to wait for (a topic that appears later is read from its start).
        let events = !exact.is_empty() || !matching.is_empty();
        let timeout = config.subscribe_timeout;
        if tokio::time::timeout(timeout, sub.assigned(events))
            .await
            .is_err()
        {
            return Err(Error::Timeout {
                operation: format!(
                    "joining Kafka consumer group `{group_id}` (waiting for its partition \
                     assignment)"
                ),
                after: timeout,
            });
        }
        tracing::debug!(group = %options.group, topics = ?subscriptions, "subscribed");
        Ok(Box::new(KafkaDeliveryStream::new(rx, sub)))
    }

    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_group(group)?;
        validate_topic(topic)?;
        let retry_topic = names::retry_topic(&self.shared.config.prefix, group)?;
        if !self.shared.topics.exists(&retry_topic).await? {
            return Err(Error::NotFound {
                what: format!(
                    "consumer group `{group}` (it never subscribed: no retry topic \
                     `{retry_topic}`)"
                ),
            });
        }
        let info = RetryInfo {
            topic: topic.to_owned(),
            attempt: 1,
            first_attempt_at: None,
            last_error: None,
            due_at_ms: Utc::now().timestamp_millis(),
            group: Some(group.to_owned()),
        };
        self.shared.send_retry(&retry_topic, &event, &info).await
    }

    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        Arc::new(self.shared.dlq.clone())
    }
}
