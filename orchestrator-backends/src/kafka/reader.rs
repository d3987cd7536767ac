//! Reading one partition of a topic from an offset up to its end, outside any consumer group
//! (the dead-letter topic, the store's log).

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use orchestrator_core::{Error, Result};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{Mutex, oneshot};

use super::client::{blocking, kafka_error};
use super::config::KafkaConfig;
use super::consumer::close_detached;

/// What a reader's callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Keep reading.
    Continue,
    /// Stop: the caller has what it needs.
    Stop,
}

/// A consumer that reads partitions by hand (assign + offset), one read at a time.
pub(crate) struct LogReader {
    /// The consumer's settings, to open it again after [`close`](Self::close).
    settings: ClientConfig,
    /// The consumer; `None` once closed, until the next use opens a new one.
    consumer: std::sync::Mutex<Option<Arc<StreamConsumer>>>,
    timeout: Duration,
    lock: Mutex<()>,
}

impl LogReader {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        let settings = config.reader(true);
        let consumer: StreamConsumer = settings.create().map_err(kafka_error)?;
        Ok(Self {
            settings,
            consumer: std::sync::Mutex::new(Some(Arc::new(consumer))),
            timeout: config.operation_timeout,
            lock: Mutex::new(()),
        })
    }

    /// The consumer, opened again if it was closed.
    fn consumer(&self) -> Result<Arc<StreamConsumer>> {
        let mut slot = self.consumer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(consumer) = slot.as_ref() {
            return Ok(Arc::clone(consumer));
        }
        let consumer: Arc<StreamConsumer> = Arc::new(self.settings.create().map_err(kafka_error)?);
        *slot = Some(Arc::clone(&consumer));
        Ok(consumer)
    }

    /// Closes the consumer and waits (at most the operation timeout) until librdkafka has
    /// let go of it, so that it fetches nothing any more: a topic it read can then be deleted
    /// (see the module docs on tansu: a fetch that meets a topic deleted under it crashes
    /// librdkafka). Each read ends by unassigning its partition, but librdkafka stops the
    /// partition's fetcher asynchronously, so only destroying the client is certain. The
    /// next read opens a new consumer.
    pub(crate) async fn close(&self) {
        let _no_read_under_way = self.lock.lock().await;
        let taken = self
            .consumer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut consumer) = taken else {
            return;
        };
        let deadline = Instant::now() + self.timeout;
        let (done, closed) = oneshot::channel::<()>();
        // Destroying a consumer blocks (see `close_detached`); a watermark request under way
        // still holds the consumer: wait for it to let go, then destroy it.
        close_detached(move || {
            loop {
                match Arc::try_unwrap(consumer) {
                    Ok(last) => {
                        drop(last);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        consumer = shared;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_still_shared) => break,
                }
            }
            drop(done);
        });
        let _ = tokio::time::timeout(self.timeout, closed).await;
    }

    /// The partition's low and high watermarks: the first offset kept and the offset the
    /// next message will get.
    pub(crate) async fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64)> {
        watermarks(&self.consumer()?, topic, partition, self.timeout).await
    }

    /// Reads `topic`/`partition` from offset `from` up to the end as it is when the read
    /// starts, handing each message to `f` in offset order, until `f` says stop. Returns the
    /// offset after the last message handed over, or `from` when there was nothing.
    pub(crate) async fn read<F>(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        mut f: F,
    ) -> Result<i64>
    where
        F: FnMut(&BorrowedMessage<'_>) -> Result<Flow>,
    {
        let _one_read_at_a_time = self.lock.lock().await;
        let consumer = self.consumer()?;
        let (low, high) = watermarks(&consumer, topic, partition, self.timeout).await?;
        let from = from.max(low);
        if from >= high {
            return Ok(from);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(kafka_error)?;
        consumer.assign(&tpl).map_err(kafka_error)?;
        let mut next = from;
        let result = loop {
            match tokio::time::timeout(self.timeout, consumer.recv()).await {
                Err(_) => {
                    break Err(Error::Timeout {
                        operation: format!(
                            "reading Kafka topic `{topic}` partition {partition} from offset \
                             {next} up to {high}"
                        ),
                        after: self.timeout,
                    });
                }
                Ok(Err(KafkaError::PartitionEOF(_))) => break Ok(next),
                Ok(Err(e)) => break Err(kafka_error(e)),
                Ok(Ok(message)) => {
                    if message.topic() != topic
                        || message.partition() != partition
                        || message.offset() < next
                    {
                        continue;
                    }
                    next = message.offset() + 1;
                    match f(&message) {
                        Ok(Flow::Continue) if next < high => {}
                        Ok(_) => break Ok(next),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        // Stop fetching until the next read; a failure here changes nothing for this one.
        let _ = consumer.unassign();
        result
    }
}

/// A partition's watermarks through `consumer` (a blocking request, run off the async
/// threads).
pub(crate) async fn watermarks(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64)> {
    let consumer = Arc::clone(consumer);
    let topic = topic.to_owned();
    blocking(move || {
        consumer
            .fetch_watermarks(&topic, partition, timeout)
            .map_err(kafka_error)
    })
    .await
}
