//! [`RedisEventStore`]: a Redis stream per event stream plus one global stream.

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::store::{validate_batch_ids, validate_stream_id};
use orchestrator_core::{
    AppendResult, Error, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    ReadAll, Result, StoreCapabilities, cloudevents,
};
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::config::RedisConfig;
use super::conn::{
    Entry, Keys, backoff, delete_prefix, parse_entries, parse_read, protocol_error, redis_error,
    with_retry,
};
use super::scripts;

/// How many entries one range read fetches.
const PAGE: usize = 1000;

/// An [`EventStore`] on Redis Streams.
///
/// Each event stream is the Redis stream `<prefix>stream:<stream id>` whose entry ids are
/// `0-<stream version>`; every event is also in the global stream `<prefix>all` with entry id
/// `0-<global position>`; `<prefix>position` counts positions; the hash
/// `<prefix>stream-ids:<stream id>` maps each event id of the stream to its version. Appends
/// run one Lua script that recognises a retry by its event ids, checks the expected version,
/// takes positions from the counter and writes both entries and the id of every event, so an
/// append — of one event or a batch — is atomic, idempotent and one round trip.
///
/// ```no_run
/// use orchestrator_backends::redis::{RedisConfig, RedisEventStore};
/// use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let store = RedisEventStore::connect(RedisConfig::new("redis://127.0.0.1:6379")?).await?;
/// let placed = EventEnvelope::new("order.placed", &serde_json::json!({"id": "o-1"}))?;
/// store.append("order-o-1", ExpectedVersion::NoStream, vec![placed]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisEventStore {
    manager: ConnectionManager,
    config: RedisConfig,
    keys: Keys,
}

impl std::fmt::Debug for RedisEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEventStore")
            .field("url", &self.config.redacted_url())
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisEventStore {
    /// Connects to Redis. Commands then go through a connection manager that reconnects on
    /// its own; each subscription opens a connection of its own for its blocking reads.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let manager = config.manager().await?;
        let keys = Keys::new(&config.prefix);
        Ok(Self {
            manager,
            config,
            keys,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Deletes every key under this store's prefix — its events and anything else stored
    /// there. Returns how many keys were deleted. Meant for tests and teardown.
    pub async fn delete_all(&self) -> Result<usize> {
        delete_prefix(&mut self.manager.clone(), &self.config.prefix).await
    }

    async fn range(&self, key: &str, start: &str, count: usize) -> Result<Vec<Entry>> {
        let value: Value = with_retry(&self.config, "XRANGE", |_| {
            let mut manager = self.manager.clone();
            async move {
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut manager)
                    .await
            }
        })
        .await?;
        parse_entries(value)
    }
}

/// Decodes a stored entry's event.
fn decode_entry(entry: &Entry) -> Result<EventEnvelope> {
    let json = entry.field("event").ok_or_else(|| {
        Error::decode(
            "event",
            format!("stream entry {} has no `event` field", entry.id),
        )
    })?;
    cloudevents::decode(json)
}

fn append_mode(expected: ExpectedVersion) -> (&'static str, u64) {
    match expected {
        ExpectedVersion::Any => ("any", 0),
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => ("none", 0),
        ExpectedVersion::StreamExists => ("exists", 0),
        ExpectedVersion::Exact(n) => ("exact", n),
    }
}

fn as_u64(value: &Value) -> Result<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).map_err(|_| protocol_error("negative number")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol_error("not a number")),
        other => Err(protocol_error(format!("expected a number, got {other:?}"))),
    }
}

#[async_trait]
impl EventStore for RedisEventStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// Everything: expected versions, event ids and batches are checked and written by one
    /// Lua script; events survive a restart of the application (and of Redis, when Redis
    /// persists its data with AOF or RDB).
    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::FULL
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        validate_stream_id(stream)?;
        validate_batch_ids(&events)?;
        self.config.max_event_size.check_append(stream, &events)?;
        let (mode, exact) = append_mode(expected);
        let (stream_key, all_key, position_key, ids_key) = (
            self.keys.stream(stream),
            self.keys.all(),
            self.keys.position(),
            self.keys.stream_ids(stream),
        );
        let mut args: Vec<(String, String, Vec<u8>)> = Vec::with_capacity(events.len());
        for event in &events {
            let event = event.clone().without_position().with_stream_id(stream);
            let mut json = cloudevents::encode(&event)?;
            // The script closes the object after adding the positions it assigns.
            if json.pop() != Some(b'}') {
                return Err(Error::encode("a CloudEvents encoding is not a JSON object"));
            }
            args.push((event.event_type().to_owned(), event.id().to_string(), json));
        }
        // An attempt sent again after a lost reply is recognised by the script as a retry of
        // the first one (by the event ids), even if another writer appended in between.
        let reply: Vec<Value> = with_retry(&self.config, "append", |_| {
            let mut invocation = scripts::APPEND.prepare_invoke();
            invocation
                .key(&stream_key)
                .key(&all_key)
                .key(&position_key)
                .key(&ids_key)
                .arg(mode)
                .arg(exact)
                .arg(args.len());
            for (event_type, id, json) in &args {
                invocation.arg(event_type).arg(id).arg(json.as_slice());
            }
            let mut manager = self.manager.clone();
            async move { invocation.invoke_async(&mut manager).await }
        })
        .await?;
        match reply.as_slice() {
            [ok, version, first, last] if as_u64(ok)? == 1 => {
                let result = AppendResult {
                    next_expected_version: as_u64(version)?,
                    first_position: as_u64(first)?,
                    last_position: as_u64(last)?,
                };
                tracing::debug!(stream, events = events.len(), ?result, "appended");
                Ok(result)
            }
            [code, index, version] if as_u64(code)? == 2 => {
                let event = usize::try_from(as_u64(index)?)
                    .ok()
                    .and_then(|i| events.get(i.checked_sub(1)?))
                    .ok_or_else(|| {
                        protocol_error(format!("append script named event #{index:?}"))
                    })?;
                Err(Error::DuplicateEvent {
                    stream: stream.to_owned(),
                    event_id: event.id().clone(),
                    version: as_u64(version)?,
                })
            }
            [_, version] => {
                let version = as_u64(version)?;
                Err(Error::WrongExpectedVersion {
                    stream: stream.to_owned(),
                    expected,
                    actual: (version > 0).then_some(version),
                })
            }
            other => Err(protocol_error(format!("append script returned {other:?}"))),
        }
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        validate_stream_id(stream)?;
        let key = self.keys.stream(stream);
        let mut out = Vec::new();
        let mut start = format!("0-{}", from_version.max(1));
        while out.len() < limit {
            let count = (limit - out.len()).min(PAGE);
            let entries = self.range(&key, &start, count).await?;
            for entry in &entries {
                out.push(decode_entry(entry)?);
            }
            match entries.last() {
                Some(last) if entries.len() == count => start = format!("({}", last.id),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        let key = self.keys.all();
        let filter = &query.filter;
        let mut out = Vec::new();
        let mut start = format!("0-{}", query.from_position.max(1));
        while out.len() < query.limit {
            let entries = self.range(&key, &start, PAGE).await?;
            for entry in &entries {
                if !type_may_match(filter, entry) {
                    continue;
                }
                let event = decode_entry(entry)?;
                if filter.matches(&event) {
                    out.push(event);
                    if out.len() >= query.limit {
                        break;
                    }
                }
            }
            match entries.last() {
                Some(last) if entries.len() == PAGE => start = format!("({}", last.id),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        let len: u64 = with_retry(&self.config, "XLEN", |_| {
            let mut manager = self.manager.clone();
            let key = self.keys.stream(stream);
            async move { redis::cmd("XLEN").arg(key).query_async(&mut manager).await }
        })
        .await?;
        Ok((len > 0).then_some(len))
    }

    async fn head_position(&self) -> Result<u64> {
        let head: Option<u64> = with_retry(&self.config, "GET", |_| {
            let mut manager = self.manager.clone();
            let key = self.keys.position();
            async move { redis::cmd("GET").arg(key).query_async(&mut manager).await }
        })
        .await?;
        Ok(head.unwrap_or(0))
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        // Fail now, not in the background, if Redis cannot be reached at all.
        let blocking = self.config.blocking_manager().await?;
        let (tx, rx) = mpsc::channel(PAGE);
        let follower = Follower {
            store: self.clone(),
            blocking,
            filter,
            last: from_position.saturating_sub(1),
            tx,
        };
        tokio::spawn(follower.run());
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }

    /// A [`RedisInbox`](super::RedisInbox) under this store's prefix, with the default
    /// retention, on this store's connection; every call's inbox shares the same keys.
    fn inbox(&self) -> Option<std::sync::Arc<dyn orchestrator_core::Inbox>> {
        Some(std::sync::Arc::new(super::RedisInbox::new(
            self.manager.clone(),
            self.config.clone(),
        )))
    }

    /// A [`RedisLease`](super::RedisLease) in the key `<prefix>lease:<name>`, lasting 5 s
    /// without renewal: the processes sharing this store elect one holder.
    fn lease(&self, name: &str) -> Option<std::sync::Arc<dyn orchestrator_core::Lease>> {
        Some(std::sync::Arc::new(super::RedisLease::new(
            self.manager.clone(),
            format!("{}lease:{name}", self.config.prefix),
            LEASE_TTL,
        )))
    }
}

/// How long a lease of the Redis store lasts without renewal.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// Whether an entry can pass the filter's type test, judged from its `type` field without
/// decoding the event.
fn type_may_match(filter: &EventFilter, entry: &Entry) -> bool {
    filter.event_types.is_empty()
        || entry
            .text("type")
            .is_none_or(|t| filter.event_types.iter().any(|f| f == t))
}

/// The task behind a subscription: reads the global stream after the last position it
/// handed over — `XRANGE` to catch up, then `XREAD BLOCK` — so there is no gap and no
/// duplicate between the two.
struct Follower {
    store: RedisEventStore,
    blocking: ConnectionManager,
    filter: EventFilter,
    last: u64,
    tx: mpsc::Sender<Result<EventEnvelope>>,
}

impl Follower {
    async fn run(mut self) {
        let key = self.store.keys.all();
        // Catch up with range reads on the shared connection.
        loop {
            let start = format!("(0-{}", self.last);
            let entries = match self.store.range(&key, &start, PAGE).await {
                Ok(entries) => entries,
                Err(error) => {
                    if self.tx.send(Err(error)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let caught_up = entries.len() < PAGE;
            if !self.forward(entries).await {
                return;
            }
            if caught_up {
                break;
            }
        }
        // Then follow live on the subscription's own connection.
        let block_ms = u64::try_from(self.store.config.block_timeout.as_millis()).unwrap_or(1000);
        let mut failures = 0u32;
        while !self.tx.is_closed() {
            let reply = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(PAGE)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&key)
                .arg(format!("0-{}", self.last))
                .query_async::<Value>(&mut self.blocking)
                .await;
            let entries = match reply.map_err(redis_error).and_then(parse_read) {
                Ok(streams) => {
                    failures = 0;
                    streams.into_iter().flat_map(|(_, e)| e).collect()
                }
                Err(error) if error.is_temporary() => {
                    failures = failures.saturating_add(1);
                    let delay = backoff()
                        .delay_after(failures)
                        .unwrap_or(Duration::from_secs(1));
                    tracing::warn!(%error, ?delay, "store subscription: reading failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(error) => {
                    let _ = self.tx.send(Err(error)).await;
                    return;
                }
            };
            if !self.forward(entries).await {
                return;
            }
        }
    }

    /// Hands over the entries that pass the filter; false once the subscriber is gone.
    async fn forward(&mut self, entries: Vec<Entry>) -> bool {
        for entry in entries {
            let Some(position) = entry.sequence() else {
                continue;
            };
            self.last = position;
            if !type_may_match(&self.filter, &entry) {
                continue;
            }
            let item = match decode_entry(&entry) {
                Ok(event) if !self.filter.matches(&event) => continue,
                other => other,
            };
            if self.tx.send(item).await.is_err() {
                return false;
            }
        }
        true
    }
}
