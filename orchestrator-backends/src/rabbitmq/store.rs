//! `RabbitMqEventStore`: an event store on one RabbitMQ stream queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use orchestrator_core::store::validate_stream_id;
use orchestrator_core::{
    AppendResult, Error, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    ReadAll, Result, StoreCapabilities, cloudevents,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::config::RabbitMqStoreConfig;
use super::connection::{
    Connector, Outgoing, Publisher, Setup, close_channel, failure, from_lapin, short,
};
use super::log::{Acks, LIVENESS_CHECK, Log, Seen, tail};
use super::transport::durable_queue;
use super::wire;

/// What the RabbitMQ event store guarantees: durable, `read_stream` supported (by scanning
/// the log), no atomic expected-version checks, no all-or-nothing batches and no idempotent
/// appends (see the [module docs](super) for why).
pub const RABBITMQ_STORE_CAPABILITIES: StoreCapabilities =
    StoreCapabilities::new(false, false, true, true);

/// An [`EventStore`] on a RabbitMQ stream queue (`x-queue-type: stream`): one append-only
/// log of every event, read from any offset. See the [module docs](super) for the layout
/// and for what it can and cannot guarantee.
///
/// Cloning is cheap and shares the connections and the index. Dropping the last clone
/// stops the log reader and ends the subscriptions.
#[derive(Clone)]
pub struct RabbitMqEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<Log>,
    publisher: Publisher,
    writer: String,
    sequence: AtomicU64,
    tailer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.log.closed.send_replace(true);
        self.tailer.abort();
    }
}

impl std::fmt::Debug for RabbitMqEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqEventStore")
            .field("stream", &self.inner.log.stream)
            .field("head", &self.inner.log.head())
            .finish_non_exhaustive()
    }
}

impl RabbitMqEventStore {
    /// Connects, declares the stream queue, and reads the log up to its current end (which
    /// takes time proportional to the log's size) before returning.
    pub async fn connect(config: RabbitMqStoreConfig) -> Result<Self> {
        config.validate()?;
        let stream = short("stream queue", config.stream())?;
        let setup: Setup = {
            let stream = stream.clone();
            Box::new(move |channel| {
                let stream = stream.clone();
                Box::pin(async move {
                    let mut arguments = FieldTable::default();
                    arguments.insert("x-queue-type".into(), wire::text("stream"));
                    channel
                        .queue_declare(stream, durable_queue(), arguments)
                        .await
                        .map(drop)
                        .map_err(from_lapin)
                })
            })
        };
        let publisher = Publisher::new(
            Connector::new(
                config.url(),
                format!("{}-append", config.connection_name()),
                config.backoff(),
            ),
            config.publish_timeout(),
            setup,
        );
        publisher.ready(config.connect_timeout()).await?;
        let log = Arc::new(Log::new(config, stream));
        let tailer = tokio::spawn(tail(log.clone()));
        let store = Self {
            inner: Arc::new(Inner {
                log,
                publisher,
                writer: uuid::Uuid::now_v7().simple().to_string(),
                sequence: AtomicU64::new(0),
                tailer,
            }),
        };
        store.sync().await?;
        Ok(store)
    }

    /// The settings this store runs with.
    pub fn config(&self) -> &RabbitMqStoreConfig {
        &self.inner.log.config
    }

    /// The bytes the in-memory stream index holds, as counted from its capacities: the
    /// figure the [module docs](super#index-memory) bound (a few bytes per event at most,
    /// plus each stream's id and entry). Only what this store's reader has indexed so far.
    pub fn index_heap_size(&self) -> usize {
        self.inner.log.index_heap_size()
    }

    /// Waits until this store has indexed every event written to the log (by any process)
    /// before the call, so that `stream_version`, `head_position` and reads see them.
    ///
    /// It writes a small sync record (no event: readers skip it, it takes one global
    /// position). [`connect`](Self::connect) does this once; a process reads its own
    /// appends at once, but sees other processes' appends only as its reader gets to them
    /// (usually within milliseconds) unless it syncs.
    pub async fn sync(&self) -> Result<()> {
        let write_id = self.next_write_id();
        let mut headers = FieldTable::default();
        headers.insert(wire::MARKER.into(), AMQPValue::Boolean(true));
        headers.insert(wire::WRITE_ID.into(), wire::text(&write_id));
        let marker = Outgoing {
            exchange: ShortString::default(),
            routing_key: self.inner.log.stream.clone(),
            body: Vec::new(),
            properties: BasicProperties::default()
                .with_delivery_mode(wire::PERSISTENT)
                .with_headers(headers),
            mandatory: true,
        };
        let seen = self.inner.log.expect(&write_id);
        if let Err(error) = self.inner.publisher.publish(&[marker]).await {
            self.inner.log.forget(&write_id);
            return Err(error);
        }
        self.wait_seen(vec![(write_id, seen)]).await.map(drop)
    }

    /// Deletes the stream queue with every event in it. For tests and teardown.
    pub async fn delete_log(&self) -> Result<()> {
        let deadline = Instant::now() + self.config().publish_timeout();
        let channel = self.inner.publisher.channel(deadline).await?;
        channel
            .queue_delete(self.inner.log.stream.clone(), QueueDeleteOptions::default())
            .await
            .map(drop)
            .map_err(from_lapin)
    }

    /// Stops the log reader and the subscriptions, and closes the connections.
    pub async fn close(&self) {
        self.inner.log.closed.send_replace(true);
        self.inner.tailer.abort();
        self.inner.publisher.close().await;
    }

    fn next_write_id(&self) -> String {
        let n = self.inner.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.inner.writer)
    }

    async fn wait_seen(&self, waits: Vec<(String, oneshot::Receiver<Seen>)>) -> Result<Vec<Seen>> {
        let deadline = Instant::now() + self.config().publish_timeout();
        let mut seen = Vec::with_capacity(waits.len());
        let mut waits = waits.into_iter();
        while let Some((write_id, receiver)) = waits.next() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match timeout(remaining, receiver).await {
                Ok(Ok(s)) => seen.push(s),
                _ => {
                    self.inner.log.forget(&write_id);
                    for (id, _) in waits {
                        self.inner.log.forget(&id);
                    }
                    return Err(failure(
                        true,
                        "the broker confirmed the append, but the log reader did not see it \
                         within the publish timeout (is the broker restarting?); the events \
                         are stored",
                    ));
                }
            }
        }
        Ok(seen)
    }
}

#[async_trait]
impl EventStore for RabbitMqEventStore {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> StoreCapabilities {
        RABBITMQ_STORE_CAPABILITIES
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        validate_stream_id(stream)?;
        short("stream id", stream)?;
        if expected != ExpectedVersion::Any {
            return Err(Error::Unsupported {
                backend: "rabbitmq",
                operation: "append with an expected version other than Any",
                hint: "a RabbitMQ stream cannot check a stream's version and append in one \
                       atomic step; append with ExpectedVersion::Any, or use a store whose \
                       capabilities include expected_version",
            });
        }
        let log = &self.inner.log;
        log.config.max_event_size().check_append(stream, &events)?;
        if events.is_empty() {
            let head = log.head();
            return Ok(AppendResult {
                next_expected_version: log.stream_version(stream).unwrap_or(0),
                first_position: head,
                last_position: head,
            });
        }
        let mut messages = Vec::with_capacity(events.len());
        let mut waits = Vec::with_capacity(events.len());
        for event in events {
            let event = event.with_stream_id(stream).without_position();
            let write_id = self.next_write_id();
            let mut properties = wire::event_properties(&event);
            properties = wire::set_header(properties, wire::STREAM_ID, wire::text(stream));
            properties = wire::set_header(properties, wire::WRITE_ID, wire::text(&write_id));
            messages.push(Outgoing {
                exchange: ShortString::default(),
                routing_key: log.stream.clone(),
                body: cloudevents::encode(&event)?,
                properties,
                mandatory: true,
            });
            waits.push(write_id);
        }
        let waits: Vec<_> = waits
            .into_iter()
            .map(|id| {
                let seen = log.expect(&id);
                (id, seen)
            })
            .collect();
        if let Err(error) = self.inner.publisher.publish(&messages).await {
            for (id, _) in &waits {
                log.forget(id);
            }
            return Err(error);
        }
        let seen = self.wait_seen(waits).await?;
        let (Some(first), Some(last)) = (seen.first(), seen.last()) else {
            return Err(failure(false, "an append of events saw none of them"));
        };
        Ok(AppendResult {
            next_expected_version: last.version,
            first_position: first.position,
            last_position: last.position,
        })
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        validate_stream_id(stream)?;
        let log = &self.inner.log;
        let positions = log.stream_positions(stream, from_version, limit);
        let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
            return Ok(Vec::new());
        };
        let mut wanted = positions.iter().peekable();
        let mut events = Vec::with_capacity(positions.len());
        log.scan(first - 1, last, |offset, delivery| {
            while wanted.next_if(|&&p| p < offset + 1).is_some() {}
            if wanted.next_if_eq(&&(offset + 1)).is_some()
                && let Some(event) = log.materialize(offset, delivery)
            {
                events.push(event);
            }
            wanted.peek().is_some()
        })
        .await?;
        Ok(events)
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        let log = &self.inner.log;
        let from = query.from_position.max(1) - 1;
        let end = log.processed();
        let mut events = Vec::new();
        if query.limit == 0 {
            return Ok(events);
        }
        log.scan(from, end, |offset, delivery| {
            if let Some(event) = log.materialize(offset, delivery)
                && query.filter.matches(&event)
            {
                events.push(event);
            }
            events.len() < query.limit
        })
        .await?;
        Ok(events)
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        Ok(self.inner.log.stream_version(stream))
    }

    async fn head_position(&self) -> Result<u64> {
        Ok(self.inner.log.head())
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow(
            self.inner.log.clone(),
            from_position.max(1) - 1,
            filter,
            tx,
        ));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(stream.boxed())
    }

    /// A [`RabbitMqLease`](super::RabbitMqLease): the exclusive queue
    /// `<stream>.lease.<name>`, held by a connection of its own.
    fn lease(&self, name: &str) -> Option<Arc<dyn orchestrator_core::Lease>> {
        let config = &self.inner.log.config;
        Some(Arc::new(super::RabbitMqLease::new(
            config.url(),
            config.connection_name(),
            format!("{}.lease.{name}", config.stream()),
            config.backoff(),
        )))
    }
}

/// Feeds one subscription: reads the log from `next` on, one consumer from catch-up to live
/// (so there is no hand-over to get wrong), re-attaching where it left off after a lost
/// connection. Ends when the subscriber goes away or the store closes.
async fn follow(
    log: Arc<Log>,
    mut next: u64,
    filter: EventFilter,
    tx: mpsc::Sender<Result<EventEnvelope>>,
) {
    let mut closed = log.closed.subscribe();
    let mut failures = 0;
    loop {
        if *closed.borrow() {
            return;
        }
        let deadline = Instant::now() + log.config.connect_timeout();
        let attached = tokio::select! {
            attached = log.open_reader(next, deadline) => attached,
            () = tx.closed() => return,
        };
        let (channel, mut consumer) = match attached {
            Ok(reader) => reader,
            Err(error) => {
                failures += 1;
                let delay = log.backoff_delay(failures);
                tracing::warn!(%error, ?delay, "a subscription cannot attach to the log; retrying");
                tokio::select! {
                    () = sleep(delay) => continue,
                    () = tx.closed() => return,
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
                () = tx.closed() => return,
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
                break;
            };
            acks.seen(&delivery).await;
            let Some(offset) = wire::header_u64(&delivery.properties, "x-stream-offset") else {
                continue;
            };
            if offset < next {
                continue;
            }
            // Versions come from the index: wait until the tailer has this record.
            tokio::select! {
                () = log.indexed(offset) => {}
                () = tx.closed() => return,
                _ = closed.changed() => return,
            }
            if let Some(event) = log.materialize(offset, &delivery)
                && filter.matches(&event)
                && tx.send(Ok(event)).await.is_err()
            {
                return;
            }
            next = offset + 1;
        }
        close_channel(&channel, "subscription restarting").await;
        tokio::select! {
            () = sleep(log.backoff_delay(1)) => {}
            () = tx.closed() => return,
        }
    }
}
