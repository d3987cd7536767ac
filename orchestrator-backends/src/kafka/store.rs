//! [`KafkaEventStore`]: every stream in one single-partition log topic.

use std::sync::{Arc, PoisonError, Weak};

use async_trait::async_trait;
use futures::StreamExt as _;
use orchestrator_core::store::validate_stream_id;
use orchestrator_core::{
    AppendResult, Error, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    ReadAll, Result, StoreCapabilities, StoredPosition, cloudevents,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use super::client::{BACKEND, TopicKind, Topics, failure, kafka_error, producer};
use super::config::KafkaConfig;
use super::consumer::close_detached;
use super::live::{self, LiveConsumer};
use super::reader::{Flow, LogReader};
use super::wire;
use crate::stream_index::StreamIndex;

/// What [`KafkaEventStore`] guarantees: durable, `read_stream` by index, but neither exact
/// expected versions, all-or-nothing batches nor idempotent appends (see the
/// [module docs](super)).
pub const KAFKA_STORE_CAPABILITIES: StoreCapabilities =
    StoreCapabilities::new(false, false, true, true);

/// An event store on a Kafka topic (feature `kafka`).
///
/// Every event of every stream is one record of the log topic (`<prefix>__orchestrator.events`
/// by default, one partition): key = stream id, value = the event as CloudEvents JSON with
/// the `streamid` extension, headers `content-type` and `traceparent`. A global position is
/// the record's offset + 1; a stream version is the event's rank among its stream's records
/// in log order. See the [module docs](super) for what that means for expected versions.
///
/// Clones share one producer, index and readers; subscriptions end when the last clone is
/// dropped.
#[derive(Clone)]
pub struct KafkaEventStore {
    inner: Arc<Inner>,
    _closer: Arc<watch::Sender<bool>>,
}

struct Inner {
    config: KafkaConfig,
    /// Topic administration, shared with the store's leases (which create their topics).
    topics: Arc<Topics>,
    topic: String,
    producer: FutureProducer,
    /// Which records belong to which stream.
    index: Mutex<Index>,
    /// Appends' records in the order they were produced, to the [indexer](index_deliveries).
    indexer: mpsc::UnboundedSender<Produced>,
    /// Held while an append hands its records to the producer and to the indexer, so that
    /// both see appends in the same order.
    produce_order: std::sync::Mutex<()>,
    index_reader: LogReader,
    query_reader: LogReader,
    closed: watch::Receiver<bool>,
}

/// Every stream's record positions (offset + 1), read from the log up to `next`; compact
/// (see the [module docs](super#the-event-store) for what it costs).
#[derive(Default)]
struct Index {
    next: i64,
    streams: StreamIndex,
}

impl Index {
    /// Records the message at `offset` of `stream` (the next one in the log).
    fn add(&mut self, stream: Option<&str>, offset: i64) {
        if let Some(stream) = stream
            && let Err(refused) = self.streams.push(stream, position_of(offset))
        {
            // Cannot happen: the log is read in offset order, from `next` on.
            tracing::error!(
                stream,
                offset,
                last = refused.last,
                "a log record out of order was not indexed"
            );
        }
        self.next = offset + 1;
    }

    /// The version of the record at `offset` in `stream`.
    fn version(&self, stream: &str, offset: i64) -> Option<u64> {
        self.streams.version_of(stream, position_of(offset))
    }
}

impl std::fmt::Debug for KafkaEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEventStore")
            .field("brokers", &self.inner.config.brokers)
            .field("topic", &self.inner.topic)
            .finish_non_exhaustive()
    }
}

/// The stream a log record belongs to: its key.
fn record_stream<'a>(message: &'a BorrowedMessage<'_>) -> Option<&'a str> {
    message.key().and_then(|k| std::str::from_utf8(k).ok())
}

impl KafkaEventStore {
    /// Connects to the log topic `config.store_topic()`, creating it (one partition,
    /// infinite retention) if needed. A topic that does not keep every record (finite
    /// `retention.ms` or `retention.bytes`, or compaction) is refused with
    /// `Error::InvalidInput` unless [`KafkaConfig::with_finite_store_retention`] allows it.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let topics = Topics::new(&config)?;
        let topic = config.store_topic();
        topics.ensure(&[&topic], TopicKind::Log).await?;
        topics.check_log_retention(&topic).await?;
        let (closer, closed) = watch::channel(false);
        let (indexer, produced) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            producer: producer(&config)?,
            index: Mutex::new(Index::default()),
            indexer,
            produce_order: std::sync::Mutex::new(()),
            index_reader: LogReader::new(&config)?,
            query_reader: LogReader::new(&config)?,
            closed,
            topics: Arc::new(topics),
            topic,
            config,
        });
        tokio::spawn(index_deliveries(Arc::downgrade(&inner), produced));
        Ok(Self {
            inner,
            _closer: Arc::new(closer),
        })
    }

    /// The log topic's name.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The bytes the in-memory stream index holds, as counted from its capacities: the
    /// figure the [module docs](super#the-event-store) bound (a few bytes per event at most,
    /// plus each stream's id and entry). Only what this store has read of the log so far.
    pub async fn index_heap_size(&self) -> usize {
        self.inner.index.lock().await.streams.heap_size()
    }

    /// Deletes the log topic with every event in it (for tests and tear-down), once this
    /// process's subscriptions to it have closed (waiting at most the operation timeout) and
    /// this store's own log readers are closed (see the module docs on tansu). Appends and
    /// reads must be over by then: a read after the deletion opens a reader again and finds
    /// no topic.
    pub async fn delete_topic(&self) -> Result<()> {
        live::wait_closed(
            &self.inner.config.prefix,
            self.inner.config.operation_timeout,
        )
        .await;
        self.inner.index_reader.close().await;
        self.inner.query_reader.close().await;
        Topics::new(&self.inner.config)?
            .delete(&[&self.inner.topic])
            .await
    }
}

/// One append's records, handed to the [indexer](index_deliveries) in the order they were
/// produced.
struct Produced {
    stream: String,
    deliveries: Vec<DeliveryFuture>,
    /// Where the append waits for its first and last offsets and the stream's version after
    /// it (`None`: nobody waits; the records are only indexed).
    reply: Option<oneshot::Sender<Result<(i64, i64, u64)>>>,
}

/// The indexer: takes every append's delivery reports in the order the records were
/// produced — which, on the log's one partition with an idempotent producer, is their order
/// in the log — and adds them to the index without reading the log back. Only a gap (records
/// produced by another process in between) is read from the log. Ends when the store is
/// dropped.
async fn index_deliveries(inner: Weak<Inner>, mut produced: mpsc::UnboundedReceiver<Produced>) {
    while let Some(Produced {
        stream,
        deliveries,
        reply,
    }) = produced.recv().await
    {
        let mut offsets = Vec::with_capacity(deliveries.len());
        let mut failed = None;
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(delivered)) => offsets.push(delivered.offset),
                Ok(Err((e, _))) => {
                    failed.get_or_insert_with(|| kafka_error(e));
                }
                Err(_) => {
                    failed.get_or_insert_with(|| failure(true, "the Kafka producer was dropped"));
                }
            }
        }
        let result = match (failed, inner.upgrade()) {
            (Some(error), _) => Err(error),
            (None, None) => Err(Error::Closed {
                what: "the Kafka event store".to_owned(),
            }),
            (None, Some(inner)) => inner.index_own(&stream, &offsets).await,
        };
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

impl Inner {
    /// Adds this process's own records (at `offsets`, in log order, all of `stream`) to the
    /// index from their delivery reports, reading the log only for the records of other
    /// writers before them. Returns the first and last offsets and the stream's version at
    /// the last.
    async fn index_own(&self, stream: &str, offsets: &[i64]) -> Result<(i64, i64, u64)> {
        let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
            return Err(failure(false, "an append delivered no record"));
        };
        let mut index = self.index.lock().await;
        for &offset in offsets {
            if offset > index.next {
                // Another writer's records come first: read them.
                self.catch_up(&mut index, Some(offset)).await?;
            }
            if offset == index.next {
                index.add(Some(stream), offset);
            }
            // Below `next`: a reader has indexed it already.
        }
        let version = index.version(stream, last).ok_or_else(|| {
            failure(
                false,
                format!(
                    "offset {last} of `{}` is missing from the index",
                    self.topic
                ),
            )
        })?;
        Ok((first, last, version))
    }

    /// Reads the log into the index until it covers offsets below `upto` (or the log's
    /// current end, if that is sooner and `upto` is `None`).
    async fn catch_up(&self, index: &mut Index, upto: Option<i64>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout;
        loop {
            if upto.is_some_and(|u| index.next >= u) {
                return Ok(());
            }
            let from = index.next;
            let next = self
                .index_reader
                .read(&self.topic, 0, from, |message| {
                    index.add(record_stream(message), message.offset());
                    Ok(match upto {
                        Some(u) if index.next >= u => Flow::Stop,
                        _ => Flow::Continue,
                    })
                })
                .await?;
            // The log may begin after `from` (retention): skip what is gone.
            index.next = index.next.max(next);
            match upto {
                None => return Ok(()),
                Some(u) if index.next >= u => return Ok(()),
                Some(u) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        operation: format!(
                            "reading the Kafka log `{}` up to offset {u}",
                            self.topic
                        ),
                        after: self.config.operation_timeout,
                    });
                }
                // Written but not yet readable (the high watermark lags): try again.
                Some(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    }

    /// The offset the next record will get: the global position of the last event.
    async fn head(&self) -> Result<i64> {
        Ok(self.index_reader.watermarks(&self.topic, 0).await?.1)
    }

    /// Decodes a log record into a stored event, without its version yet.
    fn decode(&self, message: &BorrowedMessage<'_>) -> Option<(i64, String, EventEnvelope)> {
        let stream = record_stream(message)?;
        let value = message.payload()?;
        match cloudevents::decode(value) {
            Ok(event) if event.stream_id() == Some(stream) => {
                Some((message.offset(), stream.to_owned(), event))
            }
            Ok(event) => Some((
                message.offset(),
                stream.to_owned(),
                event.with_stream_id(stream),
            )),
            Err(error) => {
                tracing::warn!(
                    topic = %self.topic,
                    offset = message.offset(),
                    %error,
                    "skipping a record of the event log that is not a CloudEvent"
                );
                None
            }
        }
    }

    /// Gives decoded records their positions, catching the index up as needed.
    async fn position(
        &self,
        records: Vec<(i64, String, EventEnvelope)>,
    ) -> Result<Vec<EventEnvelope>> {
        let Some(last) = records.last().map(|r| r.0) else {
            return Ok(Vec::new());
        };
        let mut index = self.index.lock().await;
        self.catch_up(&mut index, Some(last + 1)).await?;
        records
            .into_iter()
            .map(|(offset, stream, event)| {
                let version = index.version(&stream, offset).ok_or_else(|| {
                    failure(
                        false,
                        format!(
                            "offset {offset} of `{}` is missing from the index",
                            self.topic
                        ),
                    )
                })?;
                Ok(stored(event, stream, version, offset))
            })
            .collect()
    }
}

/// The event with its store position.
fn stored(event: EventEnvelope, stream: String, version: u64, offset: i64) -> EventEnvelope {
    event.with_position(
        stream,
        StoredPosition {
            stream_version: version,
            global_position: u64::try_from(offset + 1).unwrap_or(0),
        },
    )
}

fn offset_of(position: u64) -> i64 {
    i64::try_from(position.max(1) - 1).unwrap_or(i64::MAX)
}

fn position_of(offset: i64) -> u64 {
    u64::try_from(offset + 1).unwrap_or(0)
}

#[async_trait]
impl EventStore for KafkaEventStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> StoreCapabilities {
        KAFKA_STORE_CAPABILITIES
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        validate_stream_id(stream)?;
        if expected != ExpectedVersion::Any {
            return Err(Error::Unsupported {
                backend: BACKEND,
                operation: "append with an expected version other than Any",
                hint: "Kafka cannot check a stream's version atomically with a write; append \
                       with ExpectedVersion::Any, or use a store with the `expected_version` \
                       capability",
            });
        }
        let inner = &self.inner;
        inner.config.max_event_size.check_append(stream, &events)?;
        if events.is_empty() {
            let head = inner.head().await?;
            let mut index = inner.index.lock().await;
            inner.catch_up(&mut index, Some(head)).await?;
            let version = index.streams.version(stream).unwrap_or(0);
            return Ok(AppendResult {
                next_expected_version: version,
                first_position: position_of(head),
                last_position: position_of(head - 1),
            });
        }
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let event = event.without_position().with_stream_id(stream);
            let value = cloudevents::encode(&event)?;
            records.push((value, wire::event_headers(&event)));
        }
        let (reply, indexed) = oneshot::channel();
        {
            let _in_order = inner
                .produce_order
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut deliveries = Vec::with_capacity(records.len());
            let mut refused = None;
            for (value, headers) in records {
                let record = FutureRecord::to(&inner.topic)
                    .partition(0)
                    .key(stream.as_bytes())
                    .payload(&value[..])
                    .headers(headers);
                match inner.producer.send_result(record) {
                    Ok(delivery) => deliveries.push(delivery),
                    Err((e, _)) => {
                        refused = Some(kafka_error(e));
                        break;
                    }
                }
            }
            // What was produced is indexed even if the rest was refused, or if this append
            // is dropped while it waits: the index stays in step with the log without
            // reading it.
            let produced = Produced {
                stream: stream.to_owned(),
                deliveries,
                reply: if refused.is_none() { Some(reply) } else { None },
            };
            if inner.indexer.send(produced).is_err() {
                return Err(Error::Closed {
                    what: format!("the Kafka event store on `{}`", inner.topic),
                });
            }
            if let Some(error) = refused {
                return Err(error);
            }
        }
        let (first, last, version) = indexed.await.map_err(|_| Error::Closed {
            what: format!("the Kafka event store on `{}`", inner.topic),
        })??;
        Ok(AppendResult {
            next_expected_version: version,
            first_position: position_of(first),
            last_position: position_of(last),
        })
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        validate_stream_id(stream)?;
        let inner = &self.inner;
        let wanted: Vec<i64> = {
            let head = inner.head().await?;
            let mut index = inner.index.lock().await;
            inner.catch_up(&mut index, Some(head)).await?;
            index
                .streams
                .positions(stream, from_version, limit)
                .into_iter()
                .map(offset_of)
                .collect()
        };
        let Some(&first) = wanted.first() else {
            return Ok(Vec::new());
        };
        let mut records = Vec::with_capacity(wanted.len());
        let mut want = wanted.iter().peekable();
        inner
            .query_reader
            .read(&inner.topic, 0, first, |message| {
                while want.next_if(|&&o| o < message.offset()).is_some() {}
                if want.next_if_eq(&&message.offset()).is_some()
                    && let Some(record) = inner.decode(message)
                {
                    records.push(record);
                }
                Ok(if want.peek().is_some() {
                    Flow::Continue
                } else {
                    Flow::Stop
                })
            })
            .await?;
        inner.position(records).await
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let mut records = Vec::new();
        inner
            .query_reader
            .read(&inner.topic, 0, offset_of(query.from_position), |message| {
                if let Some(record) = inner.decode(message)
                    && query.filter.matches(&record.2)
                {
                    records.push(record);
                }
                Ok(if records.len() >= query.limit {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            })
            .await?;
        inner.position(records).await
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        let inner = &self.inner;
        let head = inner.head().await?;
        let mut index = inner.index.lock().await;
        inner.catch_up(&mut index, Some(head)).await?;
        Ok(index.streams.version(stream))
    }

    async fn head_position(&self) -> Result<u64> {
        Ok(u64::try_from(self.inner.head().await?).unwrap_or(0))
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        let inner = Arc::clone(&self.inner);
        let consumer: StreamConsumer = inner.config.reader(false).create().map_err(kafka_error)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&inner.topic, 0, Offset::Offset(offset_of(from_position)))
            .map_err(kafka_error)?;
        consumer.assign(&tpl).map_err(kafka_error)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow(inner, consumer, filter, tx));
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }

    /// A [`KafkaLease`](super::KafkaLease): partition 0 of the one-partition topic
    /// `<prefix>__orchestrator.lease.<name>`, as the consumer group of the same name assigns
    /// it; a standby takes over within a session timeout
    /// ([`KafkaConfig::with_lease_session_timeout`], 6 s) of the holder's death, and within a
    /// rebalance of its release.
    fn lease(&self, name: &str) -> Option<Arc<dyn orchestrator_core::Lease>> {
        Some(Arc::new(super::KafkaLease::new(
            self.inner.config.clone(),
            Arc::clone(&self.inner.topics),
            name,
        )))
    }
}

/// A subscription's task: reads the log from its position on, for as long as the receiver
/// and the store live.
async fn follow(
    inner: Arc<Inner>,
    consumer: StreamConsumer,
    filter: EventFilter,
    tx: mpsc::Sender<Result<EventEnvelope>>,
) {
    let live = LiveConsumer::new(&inner.config.prefix);
    let mut closed = inner.closed.clone();
    loop {
        let message = tokio::select! {
            () = tx.closed() => break,
            changed = closed.changed() => match changed {
                Ok(()) => continue,
                Err(_) => break,
            },
            message = consumer.recv() => message,
        };
        let item = match message {
            Ok(message) => {
                let Some((offset, stream, event)) = inner.decode(&message) else {
                    continue;
                };
                let mut index = inner.index.lock().await;
                if index.next == offset {
                    // This subscription is the first to read this record: index it here
                    // rather than reading it again.
                    index.add(Some(&stream), offset);
                }
                if let Err(error) = inner.catch_up(&mut index, Some(offset + 1)).await {
                    Err(error)
                } else {
                    match index.version(&stream, offset) {
                        Some(version) => {
                            let event = stored(event, stream, version, offset);
                            if !filter.matches(&event) {
                                continue;
                            }
                            Ok(event)
                        }
                        None => Err(failure(
                            false,
                            format!(
                                "offset {offset} of `{}` is missing from the index",
                                inner.topic
                            ),
                        )),
                    }
                }
            }
            Err(error) => {
                let error = kafka_error(error);
                if error.is_temporary() {
                    tracing::warn!(%error, topic = %inner.topic, "event log subscription: retrying");
                    continue;
                }
                Err(error)
            }
        };
        let fatal = item.is_err();
        if tx.send(item).await.is_err() || fatal {
            break;
        }
    }
    close_detached(move || {
        drop(consumer);
        drop(live);
    });
}
