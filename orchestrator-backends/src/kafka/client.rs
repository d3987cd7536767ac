//! The clients every part shares: error mapping, the admin client (topics), the producer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use orchestrator_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::config::KafkaConfig;

/// The backend's name in errors.
pub(crate) const BACKEND: &str = "kafka";

/// Wraps a librdkafka error; `temporary` when retrying may help (a broker away, a timeout).
pub(crate) fn kafka_error(error: KafkaError) -> Error {
    let temporary = is_temporary(&error);
    Error::backend(BACKEND, temporary, without_secret(error))
}

/// A configuration error names the property and its value, and librdkafka's description
/// may repeat the value: hide both when the property holds a secret.
fn without_secret(error: KafkaError) -> KafkaError {
    match error {
        KafkaError::ClientConfig(code, description, key, value)
            if super::url::is_secret_key(&key) =>
        {
            let description = if value.is_empty() {
                description
            } else {
                description.replace(&value, "***")
            };
            KafkaError::ClientConfig(code, description, key, "***".to_owned())
        }
        other => other,
    }
}

/// A failure of ours around Kafka (a malformed record, a task that died).
pub(crate) fn failure(temporary: bool, message: impl Into<String>) -> Error {
    Error::backend(BACKEND, temporary, message.into())
}

fn is_temporary(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => false,
        other => !matches!(
            other.rdkafka_error_code(),
            Some(
                C::InvalidArgument
                    | C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::InvalidMessage
                    | C::InvalidTopic
                    | C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::Authentication
                    | C::UnsupportedSASLMechanism
                    | C::UnsupportedFeature
                    | C::NotImplemented
                    | C::Fatal
                    | C::Fenced
                    | C::InvalidGroupId
            )
        ),
    }
}

/// Runs a blocking librdkafka call (metadata, watermarks) off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| failure(false, format!("a blocking Kafka call panicked: {e}")))?
}

/// Topic administration: creating (once) and deleting topics.
pub(crate) struct Topics {
    config: KafkaConfig,
    admin: AdminClient<DefaultClientContext>,
    /// A consumer used for metadata requests only.
    metadata: Arc<BaseConsumer>,
    /// Topics known to exist, with their partition count when known.
    known: Mutex<HashMap<String, Option<i32>>>,
}

/// How a topic is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopicKind {
    /// An event topic or a retry topic: the configured partition count.
    Partitioned,
    /// A log read in one order (the store's log): one partition.
    Log,
    /// The dead-letter topic: one partition, compacted (removals are tombstones).
    Compacted,
}

impl Topics {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        let admin = config.admin().create().map_err(kafka_error)?;
        let metadata = config.reader(false).create().map_err(kafka_error)?;
        Ok(Self {
            config: config.clone(),
            admin,
            metadata: Arc::new(metadata),
            known: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `topic` is known to exist without asking the cluster.
    pub(crate) fn is_known(&self, topic: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(topic)
    }

    fn remember(&self, topic: &str, partitions: Option<i32>) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = known.entry(topic.to_owned()).or_default();
        if partitions.is_some() {
            *entry = partitions;
        }
    }

    /// How many partitions `topic` has (cached; a metadata request the first time).
    pub(crate) async fn partitions(&self, topic: &str) -> Result<i32> {
        let cached = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .copied()
            .flatten();
        if let Some(n) = cached {
            return Ok(n);
        }
        match self.metadata_of(topic).await? {
            Some(n) => {
                self.remember(topic, Some(n));
                Ok(n)
            }
            None => Err(Error::NotFound {
                what: format!("Kafka topic `{topic}`"),
            }),
        }
    }

    /// The partition count of `topic` from a metadata request; `None` if it does not exist.
    async fn metadata_of(&self, topic: &str) -> Result<Option<i32>> {
        let consumer = Arc::clone(&self.metadata);
        let name = topic.to_owned();
        let timeout = self.config.operation_timeout;
        blocking(move || {
            let metadata = consumer
                .fetch_metadata(Some(&name), timeout)
                .map_err(kafka_error)?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                .and_then(|t| i32::try_from(t.partitions().len()).ok()))
        })
        .await
    }

    /// Whether the cluster has `topic` (a metadata request unless known).
    pub(crate) async fn exists(&self, topic: &str) -> Result<bool> {
        if self.is_known(topic) {
            return Ok(true);
        }
        let partitions = self.metadata_of(topic).await?;
        if partitions.is_some() {
            self.remember(topic, partitions);
        }
        Ok(partitions.is_some())
    }

    /// Makes sure `topics` exist: creates the missing ones (if the config allows), and
    /// accepts "already exists". Returns the topics that this call created.
    pub(crate) async fn ensure(&self, topics: &[&str], kind: TopicKind) -> Result<Vec<String>> {
        // Ask before creating: a CreateTopics of an existing topic is wasted work everywhere,
        // and on tansu it corrupts later reads (see the module docs).
        let mut missing = Vec::new();
        for &topic in topics {
            if !self.exists(topic).await? {
                missing.push(topic);
            }
        }
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        if !self.config.create_topics {
            return Err(Error::NotFound {
                what: format!(
                    "Kafka topic `{}` (topic creation is turned off; create it, or use \
                     KafkaConfig::with_create_topics(true))",
                    missing.join("`, `")
                ),
            });
        }
        let partitions = match kind {
            TopicKind::Partitioned => self.config.partitions,
            TopicKind::Log | TopicKind::Compacted => 1,
        };
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                let topic = NewTopic::new(
                    t,
                    partitions,
                    TopicReplication::Fixed(self.config.replication_factor),
                );
                match kind {
                    TopicKind::Compacted => topic.set("cleanup.policy", "compact"),
                    // The store's log keeps every record: its versions are ranks in it.
                    TopicKind::Log => topic
                        .set("cleanup.policy", "delete")
                        .set("retention.ms", "-1")
                        .set("retention.bytes", "-1"),
                    TopicKind::Partitioned => topic,
                }
            })
            .collect();
        let options = self.options();
        let results = self
            .admin
            .create_topics(new.iter(), &options)
            .await
            .map_err(kafka_error)?;
        let mut created = Vec::new();
        for result in results {
            match result {
                Ok(topic) => {
                    self.remember(&topic, Some(partitions));
                    created.push(topic);
                }
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => self.remember(&topic, None),
                Err((topic, code)) => {
                    return Err(failure(
                        !matches!(
                            code,
                            RDKafkaErrorCode::InvalidTopic
                                | RDKafkaErrorCode::TopicAuthorizationFailed
                                | RDKafkaErrorCode::ClusterAuthorizationFailed
                                | RDKafkaErrorCode::InvalidPartitions
                                | RDKafkaErrorCode::InvalidReplicationFactor
                                | RDKafkaErrorCode::InvalidConfig
                        ),
                        format!("cannot create Kafka topic `{topic}`: {code}"),
                    ));
                }
            }
        }
        if !created.is_empty() {
            // The broker answers CreateTopics before every broker knows the topic; wait until
            // its metadata shows the partitions, so that producers and consumers find them.
            for topic in &created {
                self.wait_visible(topic).await?;
            }
        }
        Ok(created)
    }

    /// Checks that the store's log topic keeps every record: `retention.ms` and
    /// `retention.bytes` -1 and no compaction (unless finite retention was allowed). A
    /// broker that does not describe topic configurations is taken at its word (logged).
    pub(crate) async fn check_log_retention(&self, topic: &str) -> Result<()> {
        if self.config.finite_store_retention {
            return Ok(());
        }
        let resource = ResourceSpecifier::Topic(topic);
        let described = self
            .admin
            .describe_configs([&resource], &self.options())
            .await;
        let config = match described.map(|mut r| r.pop()) {
            Ok(Some(Ok(config))) => config,
            Ok(Some(Err(code))) => {
                tracing::warn!(topic, %code, "cannot check the Kafka store topic's retention");
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(error) => {
                tracing::warn!(topic, %error, "cannot check the Kafka store topic's retention");
                return Ok(());
            }
        };
        let value = |name: &str| config.get(name).and_then(|e| e.value.clone());
        let mut finite = Vec::new();
        for name in ["retention.ms", "retention.bytes"] {
            if let Some(v) = value(name)
                && v.trim() != "-1"
            {
                finite.push(format!("{name}={v}"));
            }
        }
        if let Some(policy) = value("cleanup.policy")
            && policy.contains("compact")
        {
            finite.push(format!("cleanup.policy={policy}"));
        }
        if finite.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(
            "Kafka store topic",
            format!(
                "`{topic}` does not keep every record ({}): stream versions are ranks in the \
                 log, so deleted or compacted records would make events vanish and renumber the \
                 rest; set retention.ms=-1, retention.bytes=-1 and cleanup.policy=delete on the \
                 topic, or accept that with KafkaConfig::with_finite_store_retention(true)",
                finite.join(", ")
            ),
        ))
    }

    /// Waits until a metadata request shows `topic` with its partitions.
    async fn wait_visible(&self, topic: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout;
        loop {
            if self.metadata_of(topic).await?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    operation: format!("waiting for new Kafka topic `{topic}` to appear"),
                    after: self.config.operation_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes `topics`; missing ones are not an error.
    pub(crate) async fn delete(&self, topics: &[&str]) -> Result<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let results = self
            .admin
            .delete_topics(topics, &self.options())
            .await
            .map_err(kafka_error)?;
        for result in results {
            match result {
                Ok(topic) | Err((topic, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    self.known
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&topic);
                }
                Err((topic, code)) => {
                    return Err(failure(
                        true,
                        format!("cannot delete Kafka topic `{topic}`: {code}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every topic of the cluster whose name starts with `prefix`.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let consumer = Arc::clone(&self.metadata);
        let prefix = prefix.to_owned();
        let timeout = self.config.operation_timeout;
        blocking(move || {
            let metadata = consumer
                .fetch_metadata(None, timeout)
                .map_err(kafka_error)?;
            Ok(metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|t| t.starts_with(&prefix))
                .collect())
        })
        .await
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(Timeout::After(self.config.operation_timeout)))
    }
}

/// Creates the idempotent producer.
pub(crate) fn producer(config: &KafkaConfig) -> Result<FutureProducer> {
    config.producer().create().map_err(kafka_error)
}

/// Sends one record and waits for its delivery report; returns (partition, offset).
pub(crate) async fn send(
    producer: &FutureProducer,
    record: FutureRecord<'_, [u8], [u8]>,
) -> Result<(i32, i64)> {
    producer
        .send(record, Timeout::Never)
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| kafka_error(e))
}
