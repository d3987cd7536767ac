//! The event store's view of its stream queue: a reader that follows the log from its first
//! record and indexes which stream each event belongs to.
//!
//! Stream versions are not written by appenders (concurrent appenders could not agree on
//! them without a lock RabbitMQ does not have): an event's version is its rank among the
//! events of its stream in log order, which every reader of the whole log computes alike.
//! The index keeps, per stream, the global positions of its events, compactly (see the
//! [module docs](super#index-memory) for what it costs).

use std::collections::HashMap;
use std::sync::{Mutex as StdMutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Consumer};
use orchestrator_core::{EventEnvelope, Result, StoredPosition, cloudevents};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep, timeout};

use super::config::RabbitMqStoreConfig;
use super::connection::{Connector, close_channel, failure, from_lapin};
use super::wire;
use crate::stream_index::StreamIndex;

/// The header RabbitMQ puts on every message read from a stream: its offset.
const OFFSET_HEADER: &str = "x-stream-offset";

/// How often an idle reader checks that its channel is still open (lapin does not always
/// wake a consumer whose connection died).
pub(crate) const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// How long a read waits for the next record it knows exists.
const READ_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the tailer saw a record it was told to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) position: u64,
    /// The event's stream version (0 for a sync marker).
    pub(crate) version: u64,
}

#[derive(Default)]
struct State {
    /// Per stream, the global positions of its events, in order.
    streams: StreamIndex,
    /// The position of the last event (not marker) seen.
    head: u64,
    /// Records this process wrote and waits to see, by write id.
    pending: HashMap<String, oneshot::Sender<Seen>>,
}

/// The indexed log, shared by the store, its tailer and its subscriptions.
pub(crate) struct Log {
    pub(crate) config: RabbitMqStoreConfig,
    pub(crate) stream: ShortString,
    reader: Connector,
    state: StdMutex<State>,
    /// How many offsets the tailer has processed: every offset below is indexed.
    progress: watch::Sender<u64>,
    pub(crate) closed: watch::Sender<bool>,
}

/// One record of the log, as far as the index cares.
enum Record {
    Event { stream: String },
    Marker,
    Foreign,
}

impl Log {
    pub(crate) fn new(config: RabbitMqStoreConfig, stream: ShortString) -> Self {
        let reader = Connector::new(
            config.url(),
            format!("{}-read", config.connection_name()),
            config.backoff(),
        );
        Self {
            config,
            stream,
            reader,
            state: StdMutex::new(State::default()),
            progress: watch::channel(0).0,
            closed: watch::channel(false).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a record about to be written; the receiver resolves when the tailer sees it.
    pub(crate) fn expect(&self, write_id: &str) -> oneshot::Receiver<Seen> {
        let (tx, rx) = oneshot::channel();
        self.state().pending.insert(write_id.to_owned(), tx);
        rx
    }

    pub(crate) fn forget(&self, write_id: &str) {
        self.state().pending.remove(write_id);
    }

    /// The stream index's heap bytes ([`StreamIndex::heap_size`]).
    pub(crate) fn index_heap_size(&self) -> usize {
        self.state().streams.heap_size()
    }

    pub(crate) fn head(&self) -> u64 {
        self.state().head
    }

    pub(crate) fn stream_version(&self, stream: &str) -> Option<u64> {
        self.state().streams.version(stream)
    }

    /// The positions of `stream`'s events from version `from` (1-based), at most `limit`.
    pub(crate) fn stream_positions(&self, stream: &str, from: u64, limit: usize) -> Vec<u64> {
        self.state().streams.positions(stream, from, limit)
    }

    /// The version of the event of `stream` at `position`.
    fn version_at(&self, stream: &str, position: u64) -> Option<u64> {
        self.state().streams.version_of(stream, position)
    }

    /// Offsets below this are indexed.
    pub(crate) fn processed(&self) -> u64 {
        *self.progress.borrow()
    }

    /// Waits until the tailer indexed `offset`.
    pub(crate) async fn indexed(&self, offset: u64) {
        let mut progress = self.progress.subscribe();
        let _ = progress.wait_for(|p| *p > offset).await;
    }

    fn record(&self, offset: u64, record: Record, write_id: Option<String>) {
        let position = offset + 1;
        let mut state = self.state();
        let version = match record {
            Record::Event { stream } => match state.streams.push(&stream, position) {
                Ok(version) => {
                    state.head = position;
                    version
                }
                Err(refused) => {
                    // Cannot happen: the tailer skips offsets below what it processed.
                    tracing::error!(%stream, position, last = refused.last, "a log record out of order was not indexed");
                    0
                }
            },
            Record::Marker | Record::Foreign => 0,
        };
        // Before the waiter hears of it: whoever it wakes must find the record indexed.
        self.progress.send_replace(offset + 1);
        if let Some(waiter) = write_id.and_then(|id| state.pending.remove(&id)) {
            let _ = waiter.send(Seen { position, version });
        }
    }

    /// A consumer of the stream from `offset` on, on a channel of its own.
    pub(crate) async fn open_reader(
        &self,
        offset: u64,
        deadline: Instant,
    ) -> Result<(Channel, Consumer)> {
        let channel = self.reader.channel(deadline).await?;
        let consumer = async {
            channel
                .basic_qos(self.config.prefetch(), BasicQosOptions::default())
                .await?;
            let mut arguments = FieldTable::default();
            arguments.insert(
                OFFSET_HEADER.into(),
                AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
            );
            channel
                .basic_consume(
                    self.stream.clone(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    arguments,
                )
                .await
        }
        .await;
        match consumer {
            Ok(consumer) => Ok((channel, consumer)),
            Err(e) => {
                close_channel(&channel, "reader failed").await;
                Err(from_lapin(e))
            }
        }
    }

    pub(crate) fn backoff_delay(&self, failures: u32) -> Duration {
        self.reader.backoff().delay(failures)
    }

    /// The event a log record holds, with its stream id, version and position; `None` for
    /// sync markers and records that are not events of this store.
    pub(crate) fn materialize(&self, offset: u64, delivery: &Delivery) -> Option<EventEnvelope> {
        if wire::header_bool(&delivery.properties, wire::MARKER) {
            return None;
        }
        let event = match cloudevents::decode(&delivery.data) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(offset, %error, "skipping a log record that is not a CloudEvent");
                return None;
            }
        };
        let stream = wire::header_str(&delivery.properties, wire::STREAM_ID)
            .or_else(|| event.stream_id().map(str::to_owned))?;
        let position = offset + 1;
        let version = self.version_at(&stream, position)?;
        Some(event.with_position(
            stream,
            StoredPosition {
                stream_version: version,
                global_position: position,
            },
        ))
    }

    /// Reads the log from `from` (an offset) up to, not including, `end`, handing each
    /// record to `visit` until it returns `false`.
    pub(crate) async fn scan(
        &self,
        from: u64,
        end: u64,
        mut visit: impl FnMut(u64, &Delivery) -> bool,
    ) -> Result<()> {
        if from >= end {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.publish_timeout();
        let (channel, mut consumer) = self.open_reader(from, deadline).await?;
        let mut acks = Acks::new(self.config.prefetch());
        let result = async {
            loop {
                let delivery = match timeout(READ_STEP_TIMEOUT, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => delivery,
                    Ok(Some(Err(e))) => return Err(from_lapin(e)),
                    Ok(None) => return Err(failure(true, "the log reader was cancelled")),
                    Err(_) => {
                        return Err(failure(
                            true,
                            format!(
                                "reading the log stalled: no record within {READ_STEP_TIMEOUT:?}"
                            ),
                        ));
                    }
                };
                let Some(offset) = wire::header_u64(&delivery.properties, OFFSET_HEADER) else {
                    continue;
                };
                acks.seen(&delivery).await;
                if offset < from {
                    continue;
                }
                if offset >= end || !visit(offset, &delivery) || offset + 1 >= end {
                    return Ok(());
                }
            }
        }
        .await;
        close_channel(&channel, "log read").await;
        result
    }
}

/// Acknowledges stream records in batches: RabbitMQ grants more records only for acked ones.
pub(crate) struct Acks {
    every: u32,
    since: u32,
}

impl Acks {
    pub(crate) fn new(prefetch: u16) -> Self {
        Self {
            every: u32::from(prefetch / 2).max(1),
            since: 0,
        }
    }

    pub(crate) async fn seen(&mut self, delivery: &Delivery) {
        self.since += 1;
        if self.since >= self.every {
            self.since = 0;
            let multiple = BasicAckOptions { multiple: true };
            let acked = timeout(Duration::from_secs(2), delivery.acker.ack(multiple)).await;
            if let Ok(Err(error)) = acked {
                tracing::debug!(%error, "acknowledging log records failed");
            }
        }
    }
}

fn classify(delivery: &Delivery) -> Record {
    if wire::header_bool(&delivery.properties, wire::MARKER) {
        return Record::Marker;
    }
    if let Some(stream) = wire::header_str(&delivery.properties, wire::STREAM_ID) {
        return Record::Event { stream };
    }
    // Written by another client: the CloudEvent's own `streamid` decides.
    match cloudevents::decode(&delivery.data) {
        Ok(event) => match event.stream_id() {
            Some(stream) => Record::Event {
                stream: stream.to_owned(),
            },
            None => Record::Foreign,
        },
        Err(_) => Record::Foreign,
    }
}

/// Follows the log from its first record for as long as the store is open, re-attaching
/// after lost connections where it left off.
pub(crate) async fn tail(log: std::sync::Arc<Log>) {
    let mut closed = log.closed.subscribe();
    let mut failures = 0;
    loop {
        if *closed.borrow() {
            return;
        }
        let next = log.processed();
        let deadline = Instant::now() + log.config.connect_timeout();
        let (channel, mut consumer) = match log.open_reader(next, deadline).await {
            Ok(reader) => reader,
            Err(error) => {
                failures += 1;
                let delay = log.backoff_delay(failures);
                tracing::warn!(%error, ?delay, "the event log reader cannot attach; retrying");
                tokio::select! {
                    () = sleep(delay) => continue,
                    _ = closed.changed() => return,
                }
            }
        };
        failures = 0;
        let mut acks = Acks::new(log.config.prefetch());
        let mut liveness = Box::pin(sleep(LIVENESS_CHECK));
        loop {
            let item = tokio::select! {
                item = consumer.next() => item,
                _ = closed.changed() => return,
                () = liveness.as_mut() => {
                    liveness.as_mut().reset(Instant::now() + LIVENESS_CHECK);
                    if channel.status().connected() {
                        continue;
                    }
                    None
                }
            };
            let Some(Ok(delivery)) = item else {
                tracing::warn!("the event log reader lost its connection; re-attaching");
                break;
            };
            acks.seen(&delivery).await;
            let Some(offset) = wire::header_u64(&delivery.properties, OFFSET_HEADER) else {
                continue;
            };
            if offset < log.processed() {
                continue;
            }
            let write_id = wire::header_str(&delivery.properties, wire::WRITE_ID);
            log.record(offset, classify(&delivery), write_id);
        }
        close_channel(&channel, "reader restarting").await;
        tokio::select! {
            () = sleep(log.backoff_delay(1)) => {}
            _ = closed.changed() => return,
        }
    }
}
