//! Reading one partition of a topic from an offset up to its end, outside any consumer group
//! (the dead-letter topic, the store's log).

use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::{Error, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::Mutex;

use super::client::{blocking, kafka_error};
use super::config::KafkaConfig;

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
    consumer: Arc<StreamConsumer>,
    timeout: Duration,
    lock: Mutex<()>,
}

impl LogReader {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        let consumer: StreamConsumer = config.reader(true).create().map_err(kafka_error)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            timeout: config.operation_timeout,
            lock: Mutex::new(()),
        })
    }

    /// The partition's low and high watermarks: the first offset kept and the offset the
    /// next message will get.
    pub(crate) async fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64)> {
        watermarks(&self.consumer, topic, partition, self.timeout).await
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
        let (low, high) = self.watermarks(topic, partition).await?;
        let from = from.max(low);
        if from >= high {
            return Ok(from);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(kafka_error)?;
        self.consumer.assign(&tpl).map_err(kafka_error)?;
        let mut next = from;
        let result = loop {
            match tokio::time::timeout(self.timeout, self.consumer.recv()).await {
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
        let _ = self.consumer.unassign();
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
