//! [`KafkaDeadLetterQueue`]: dead letters in a compacted topic keyed by letter id.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Result};
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Mutex;

use super::client::{BACKEND, TopicKind, Topics, producer, send};
use super::config::KafkaConfig;
use super::names;
use super::reader::{Flow, LogReader};
use super::wire;

/// The durable dead-letter queue of a [`KafkaTransport`](super::KafkaTransport).
///
/// Letters live in the topic `<prefix>__orchestrator.deadletters` (one partition, so
/// "oldest first" is the topic's order; `cleanup.policy=compact`). Each letter is one
/// record: key = the letter's id, value = the letter as JSON (`id`, `topic`, `subscription`,
/// `reason`, `attempts`, `first_failure_at`, `last_failure_at`, and `event`, the event as a
/// CloudEvents object), header `content-type: application/json`.
///
/// Kafka cannot delete one record, so [`remove`](DeadLetterQueue::remove) writes a
/// **tombstone**: a record with the letter's id as key and no value. Readers apply records in
/// order, so a removed letter stays removed for every reader, after restarts too; compaction
/// eventually drops both the letter and its tombstone from the log.
///
/// `list`, `get` and `len` first read the records added since the previous call (the whole
/// topic, from the beginning, on the first call) into an in-memory index, so every process
/// sees every other's letters and removals. Two processes removing the same letter at the
/// same moment may both return it.
#[derive(Clone)]
pub struct KafkaDeadLetterQueue {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    producer: FutureProducer,
    reader: LogReader,
    state: Mutex<State>,
}

/// What has been read of the topic.
#[derive(Default)]
struct State {
    /// The offset to read next.
    next: i64,
    /// Letters by offset (oldest first).
    letters: BTreeMap<i64, DeadLetter>,
    /// Letter id → offset.
    ids: HashMap<String, i64>,
}

impl std::fmt::Debug for KafkaDeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetterQueue")
            .field("topic", &self.inner.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaDeadLetterQueue {
    /// Connects to the dead-letter topic under `config`'s prefix, creating it if needed.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let topics = Topics::new(&config)?;
        let producer = producer(&config)?;
        Self::with_parts(&config, producer, &topics).await
    }

    pub(crate) async fn with_parts(
        config: &KafkaConfig,
        producer: FutureProducer,
        topics: &Topics,
    ) -> Result<Self> {
        let topic = names::dead_letter_topic(&config.prefix);
        topics.ensure(&[&topic], TopicKind::Compacted).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                topic,
                producer,
                reader: LogReader::new(config)?,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// The dead-letter topic's name.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// Closes the reader of the dead-letter topic, before the topic is deleted (the next
    /// read opens it again).
    pub(crate) async fn close_reader(&self) {
        self.inner.reader.close().await;
    }

    /// Reads what was added since the last refresh.
    async fn refresh(&self, state: &mut State) -> Result<()> {
        let from = state.next;
        let topic = &self.inner.topic;
        let skip = |offset: i64| {
            tracing::warn!(%topic, offset, "skipping a record of the dead-letter topic that is not a letter");
        };
        let next = self
            .inner
            .reader
            .read(&self.inner.topic, 0, from, |message| {
                let offset = message.offset();
                let id = message
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .map(str::to_owned);
                match (id, message.payload()) {
                    (Some(id), None) => {
                        if let Some(old) = state.ids.remove(&id) {
                            state.letters.remove(&old);
                        }
                    }
                    (id, Some(value)) => match DeadLetter::from_json(value) {
                        Ok(letter) if id.as_deref().is_none_or(|id| id == letter.id) => {
                            if let Some(old) = state.ids.insert(letter.id.clone(), offset) {
                                state.letters.remove(&old);
                            }
                            state.letters.insert(offset, letter);
                        }
                        Ok(_) | Err(_) => skip(offset),
                    },
                    (None, None) => skip(offset),
                }
                Ok(Flow::Continue)
            })
            .await?;
        state.next = next.max(from);
        Ok(())
    }
}

#[async_trait]
impl DeadLetterQueue for KafkaDeadLetterQueue {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn push(&self, letter: DeadLetter) -> Result<()> {
        // Core's shared letter form, as the Redis dead-letter queue stores it.
        let value = letter.to_json()?;
        let headers = OwnedHeaders::new().insert(Header {
            key: wire::CONTENT_TYPE,
            value: Some("application/json"),
        });
        let record = FutureRecord::to(&self.inner.topic)
            .key(letter.id.as_bytes())
            .payload(&value[..])
            .headers(headers);
        send(&self.inner.producer, record).await?;
        tracing::debug!(letter = %letter.id, event = %letter.event.id(), "dead letter parked");
        Ok(())
    }

    async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let mut state = self.inner.state.lock().await;
        self.refresh(&mut state).await?;
        Ok(state
            .letters
            .values()
            .filter(|l| query.matches(l))
            .skip(query.offset)
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let mut state = self.inner.state.lock().await;
        self.refresh(&mut state).await?;
        Ok(state
            .ids
            .get(id)
            .and_then(|o| state.letters.get(o))
            .cloned())
    }

    async fn remove(&self, id: &str) -> Result<Option<DeadLetter>> {
        let mut state = self.inner.state.lock().await;
        self.refresh(&mut state).await?;
        let Some(&offset) = state.ids.get(id) else {
            return Ok(None);
        };
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.inner.topic).key(id.as_bytes());
        send(&self.inner.producer, record).await?;
        state.ids.remove(id);
        Ok(state.letters.remove(&offset))
    }

    async fn len(&self) -> Result<usize> {
        let mut state = self.inner.state.lock().await;
        self.refresh(&mut state).await?;
        Ok(state.letters.len())
    }
}
