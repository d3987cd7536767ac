//! One consumer of a group: the reader task, the deliveries it hands out and how they are
//! settled.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use orchestrator_core::envelope::validate_event_type;
use orchestrator_core::{
    Acknowledge, DeadLetter, Delivery, DeliveryInfo, DeliveryStream, EventEnvelope, Result,
    SubscribeOptions,
};
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::conn::{
    Entry, backoff, is_no_group, parse_autoclaim, parse_read, redis_error, with_retry,
};
use super::settle::{AckItem, Acker, ack_loop, move_due};
use super::transport::{RedisTransport, Shared, lock};

/// The entries this consumer holds and has not settled: read ahead, or handed out. Their
/// idle time is reset at every claim round, so that no consumer of the group — this one
/// included — reclaims them while this consumer lives.
pub(super) type InFlight = Arc<std::sync::Mutex<HashSet<(Arc<str>, String)>>>;

/// The event type given to dead letters made of entries that hold no readable event.
const INVALID_EVENT_TYPE: &str = "orchestrator.invalid";

/// The deliveries of one subscription, read ahead by a background task one batch (one
/// `XREADGROUP`) at a time.
pub(crate) struct RedisDeliveries {
    rx: mpsc::Receiver<Result<Vec<Pending>>>,
    /// The rest of the last batch. Dropped with the stream, each goes back to Redis (see
    /// [`Acker`]'s `Drop`) without counting an attempt.
    buffer: VecDeque<Pending>,
}

/// A delivery read from Redis and not yet handed to the application.
pub(crate) struct Pending {
    event: EventEnvelope,
    info: DeliveryInfo,
    acker: Acker,
}

impl Pending {
    /// The delivery, now the application's: if it is dropped unsettled it goes back as a
    /// further attempt (one never handed out goes back without counting one).
    fn hand_out(mut self) -> Delivery {
        self.acker.handed_out = true;
        Delivery::new(self.event, self.info, Box::new(self.acker))
    }
}

#[async_trait]
impl DeliveryStream for RedisDeliveries {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        loop {
            if let Some(pending) = self.buffer.pop_front() {
                return Ok(Some(pending.hand_out()));
            }
            // Cancel-safe: a batch is either received whole or left in the channel.
            match self.rx.recv().await {
                None => return Ok(None),
                Some(Err(error)) => return Err(error),
                Some(Ok(batch)) => self.buffer.extend(batch),
            }
        }
    }

    /// Hands out what the last read from Redis brought, up to `max`, in one call.
    async fn next_batch(&mut self, max: usize, into: &mut Vec<Delivery>) -> Result<bool> {
        let Some(first) = self.next().await? else {
            return Ok(false);
        };
        into.push(first);
        for _ in 1..max {
            let Some(pending) = self.buffer.pop_front() else {
                break;
            };
            into.push(pending.hand_out());
        }
        Ok(true)
    }
}

/// Starts a consumer of `options.group` reading `streams` (the group's retry stream first).
pub(crate) async fn start(
    transport: &RedisTransport,
    options: SubscribeOptions,
    streams: Vec<String>,
) -> Result<RedisDeliveries> {
    let shared = transport.shared.clone();
    let blocking = shared.config.blocking_manager().await?;
    let prefetch = options.prefetch.max(1);
    // One batch waits here while the application works through the one before.
    let (tx, rx) = mpsc::channel(1);
    let (acks, ack_rx) = mpsc::unbounded_channel();
    let consumer = uuid::Uuid::now_v7().simple().to_string();
    let group: Arc<str> = Arc::from(options.group.as_str());
    tokio::spawn(ack_loop(shared.clone(), group.clone(), ack_rx));
    let now = Instant::now();
    let reader = Reader {
        transport: transport.clone(),
        shared,
        blocking,
        exact_only: options.patterns.iter().all(|p| p.is_exact()),
        options,
        group,
        consumer,
        known: streams.iter().cloned().collect(),
        streams,
        tx,
        acks,
        in_flight: InFlight::default(),
        backlog: VecDeque::new(),
        prefetch,
        next_poll: now,
        next_discovery: now,
        next_claim: now,
        next_alive: now + alive_interval(&transport.shared),
    };
    tracing::debug!(group = %reader.options.group, consumer = %reader.consumer, "consumer started");
    transport.track(tokio::spawn(reader.run()));
    Ok(RedisDeliveries {
        rx,
        buffer: VecDeque::new(),
    })
}

struct Reader {
    transport: RedisTransport,
    shared: Arc<Shared>,
    blocking: ConnectionManager,
    options: SubscribeOptions,
    group: Arc<str>,
    exact_only: bool,
    consumer: String,
    streams: Vec<String>,
    known: HashSet<String>,
    tx: mpsc::Sender<Result<Vec<Pending>>>,
    acks: mpsc::UnboundedSender<AckItem>,
    in_flight: InFlight,
    /// Reclaimed entries waiting for room in the channel.
    backlog: VecDeque<Vec<Pending>>,
    prefetch: usize,
    next_poll: Instant,
    next_discovery: Instant,
    next_claim: Instant,
    /// When an ephemeral group's alive key is renewed next.
    next_alive: Instant,
}

/// How often an ephemeral group's consumer renews its alive key: three times per expiry.
fn alive_interval(shared: &Shared) -> Duration {
    shared.config.ephemeral_timeout / 3
}

impl Reader {
    async fn run(mut self) {
        let mut closed = self.shared.closed.subscribe();
        let mut failures = 0u32;
        loop {
            if *closed.borrow() || self.tx.is_closed() {
                break;
            }
            let step = tokio::select! {
                step = self.step() => step,
                _ = closed.changed() => break,
            };
            match step {
                Ok(()) => failures = 0,
                Err(error) if error.is_temporary() => {
                    failures = failures.saturating_add(1);
                    let delay = backoff()
                        .delay_after(failures)
                        .unwrap_or(Duration::from_secs(1));
                    tracing::warn!(group = %self.options.group, %error, ?delay, "consumer: reading failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::error!(group = %self.options.group, %error, "consumer stopped");
                    let _ = self.tx.send(Err(error)).await;
                    break;
                }
            }
        }
        if self.options.ephemeral {
            // The consumer is gone, and with it the group (its events included).
            if let Err(error) = self.transport.remove_group(&self.options.group).await {
                tracing::warn!(group = %self.options.group, %error, "could not remove an ephemeral group; the next subscription removes it once its alive key expires");
            }
        }
        tracing::debug!(group = %self.options.group, consumer = %self.consumer, "consumer stopped");
    }

    /// Housekeeping that is due, then one blocking read.
    async fn step(&mut self) -> Result<()> {
        let now = Instant::now();
        if now >= self.next_poll {
            let wait = move_due(&self.shared, &self.options.group).await?;
            let poll = self.shared.config.delayed_poll_interval;
            self.next_poll = Instant::now() + wait.map_or(poll, |w| w.min(poll));
        }
        if !self.exact_only && now >= self.next_discovery {
            self.discover().await?;
            self.next_discovery = Instant::now() + self.shared.config.discovery_interval;
        }
        if now >= self.next_claim {
            self.claim().await?;
            self.next_claim = Instant::now() + self.shared.config.claim_interval();
        }
        if self.options.ephemeral && now >= self.next_alive {
            self.transport.keep_alive(&self.options.group).await?;
            self.next_alive = Instant::now() + alive_interval(&self.shared);
        }
        let mut until = self.next_poll.min(self.next_claim);
        if self.options.ephemeral {
            until = until.min(self.next_alive);
        }
        if !self.exact_only {
            until = until.min(self.next_discovery);
        }
        // Read only when there is room for the batch; housekeeping goes on meanwhile (held
        // entries must be touched however slowly the application consumes).
        let permit = tokio::select! {
            permit = self.tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return Ok(()),
            },
            () = tokio::time::sleep_until(until.into()) => return Ok(()),
        };
        if let Some(reclaimed) = self.backlog.pop_front() {
            permit.send(Ok(reclaimed));
            return Ok(());
        }
        let count = self.prefetch;
        let block = until
            .saturating_duration_since(Instant::now())
            .min(self.shared.config.block_timeout)
            .max(Duration::from_millis(1));
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(1000))
            .arg("STREAMS")
            .arg(&self.streams);
        for _ in &self.streams {
            cmd.arg(">");
        }
        let reply = cmd.query_async::<Value>(&mut self.blocking).await;
        let streams = match reply {
            Ok(value) => parse_read(value)?,
            Err(error) if is_no_group(&error) => {
                // A stream or group was deleted under us: make them again, reading whatever
                // the stream holds now (it was written after the deletion).
                tracing::warn!(group = %self.options.group, "consumer group missing; recreating");
                for key in self.streams.clone() {
                    self.transport
                        .create_group(&key, &self.options.group, "0")
                        .await?;
                }
                return Ok(());
            }
            Err(error) => return Err(redis_error(error)),
        };
        let mut batch = Vec::with_capacity(count);
        for (key, entries) in streams {
            let key: Arc<str> = Arc::from(key);
            for entry in entries {
                if let Some(pending) = self.pending_or_dead_letter(&key, entry, false).await {
                    batch.push(pending);
                }
            }
        }
        if !batch.is_empty() {
            self.hold(&batch);
            permit.send(Ok(batch));
        }
        Ok(())
    }

    fn hold(&self, batch: &[Pending]) {
        let mut in_flight = lock(&self.in_flight);
        for pending in batch {
            in_flight.insert((
                pending.acker.stream_key.clone(),
                pending.acker.entry_id.clone(),
            ));
        }
    }

    /// Resets the idle time of the entries this consumer holds (`XCLAIM … JUSTID`, which
    /// does not count as a delivery), so they are not reclaimed from a live consumer.
    async fn touch(&self) -> Result<()> {
        let mut by_key: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
        for (key, id) in lock(&self.in_flight).iter() {
            by_key.entry(key.clone()).or_default().push(id.clone());
        }
        if by_key.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, ids) in &by_key {
            pipe.cmd("XCLAIM")
                .arg(&**key)
                .arg(&*self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(ids)
                .arg("JUSTID")
                .ignore();
        }
        with_retry(&self.shared.config, "XCLAIM", |_| {
            let mut manager = self.shared.manager.clone();
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut manager).await }
        })
        .await
    }

    /// Adds the streams of newly registered topics that the patterns match.
    async fn discover(&mut self) -> Result<()> {
        for topic in self.transport.topics().await? {
            if !self.options.matches(&topic) {
                continue;
            }
            let key = self.shared.keys.topic(&topic);
            if self.known.contains(&key) {
                continue;
            }
            // Registering a topic creates the groups of matching patterns; a group can only be
            // missing here if the registering client stopped half-way, and then the stream
            // holds only events published since the topic was new.
            self.transport
                .create_group(&key, &self.options.group, "0")
                .await?;
            tracing::debug!(group = %self.options.group, topic, "pattern subscription found a new topic");
            self.known.insert(key.clone());
            self.streams.push(key);
        }
        Ok(())
    }

    /// Reclaims entries that stayed unsettled with any consumer of the group for longer than
    /// the claim min-idle time (`XAUTOCLAIM`), and delivers them again.
    async fn claim(&mut self) -> Result<()> {
        self.touch().await?;
        if !self.backlog.is_empty() {
            // The last round's catch is not even handed over yet.
            return Ok(());
        }
        let min_idle = u64::try_from(self.shared.config.claim_min_idle.as_millis()).unwrap_or(0);
        for key in self.streams.clone() {
            let mut cursor = "0-0".to_owned();
            // Bounded, so a large backlog does not starve reading.
            for _ in 0..10 {
                let reply: Value = with_retry(&self.shared.config, "XAUTOCLAIM", |_| {
                    let mut manager = self.shared.manager.clone();
                    let mut cmd = redis::cmd("XAUTOCLAIM");
                    cmd.arg(&key)
                        .arg(&self.options.group)
                        .arg(&self.consumer)
                        .arg(min_idle)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(self.prefetch);
                    async move { cmd.query_async(&mut manager).await }
                })
                .await?;
                let (next, entries, deleted) = parse_autoclaim(reply)?;
                if !deleted.is_empty() {
                    // Entries trimmed away while pending: nothing left to deliver.
                    for id in deleted {
                        let _ = self.acks.send(AckItem {
                            key: Arc::from(key.as_str()),
                            id,
                            delete: false,
                        });
                    }
                }
                let key_arc: Arc<str> = Arc::from(key.as_str());
                let mut batch = Vec::new();
                for entry in entries {
                    if lock(&self.in_flight).contains(&(key_arc.clone(), entry.id.clone())) {
                        // Ours, still held: it only looked idle.
                        continue;
                    }
                    tracing::debug!(group = %self.group, entry = %entry.id, "reclaimed an unsettled delivery");
                    if let Some(pending) = self.pending_or_dead_letter(&key_arc, entry, true).await
                    {
                        batch.push(pending);
                    }
                }
                if !batch.is_empty() {
                    self.hold(&batch);
                    self.backlog.push_back(batch);
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// Turns an entry into a delivery; entries that hold no valid event are dead-lettered
    /// instead.
    async fn pending_or_dead_letter(
        &self,
        key: &Arc<str>,
        entry: Entry,
        reclaimed: bool,
    ) -> Option<Pending> {
        let (acker, reason) = match self.pending(key, entry, reclaimed) {
            Ok(pending) => return Some(pending),
            Err(unreadable) => unreadable,
        };
        let envelope = match invalid_envelope(&acker) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(%error, "cannot describe an unreadable entry; acking it");
                let _ = Box::new(acker).ack().await;
                return None;
            }
        };
        let letter = DeadLetter::new(
            envelope,
            acker.topic.to_string(),
            self.options.group.clone(),
            reason,
            acker.attempt,
            acker.first_attempt_at,
            Utc::now(),
        );
        // The reason stays out of the log: it may quote the entry, and payloads are not logged.
        tracing::warn!(group = %self.group, entry = %acker.entry_id, letter = %letter.id, "dead-lettering an unreadable entry");
        if let Err(error) = Box::new(acker).dead_letter(letter).await {
            // It stays pending and is reclaimed (and judged again) later.
            tracing::error!(%error, "could not dead-letter an unreadable entry");
        }
        None
    }

    #[allow(clippy::result_large_err)]
    fn pending(
        &self,
        key: &Arc<str>,
        entry: Entry,
        reclaimed: bool,
    ) -> std::result::Result<Pending, (Acker, String)> {
        let is_retry = self.streams.first().is_some_and(|k| **k == **key);
        let topic = if is_retry {
            entry.text("topic").unwrap_or_default().to_owned()
        } else {
            self.shared.keys.topic_of(key).unwrap_or(key).to_owned()
        };
        let mut attempt = if is_retry {
            entry
                .text("attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(1)
        } else {
            1
        };
        let mut last_error = entry
            .text("error")
            .filter(|e| is_retry && !e.is_empty())
            .map(str::to_owned);
        if reclaimed {
            attempt += 1;
            last_error.get_or_insert_with(|| {
                format!(
                    "not settled within {:?}; reclaimed from its consumer",
                    self.shared.config.claim_min_idle
                )
            });
        }
        let first_attempt_at = entry
            .text("first")
            .filter(|_| is_retry)
            .and_then(|f| f.parse::<i64>().ok())
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .unwrap_or_else(Utc::now);
        let event_type = entry.text("type").unwrap_or_default().to_owned();
        let decoded = match entry.field("event") {
            None => Err(format!(
                "entry {} of `{key}` has no `event` field",
                entry.id
            )),
            // Refused over the limit before decoding: the entry is dead-lettered.
            Some(json) => self
                .shared
                .config
                .max_event_size
                .decode(json)
                .map_err(|e| format!("entry {} of `{key}`: {e}", entry.id)),
        };
        let Entry { id, fields } = entry;
        let event_json = fields
            .into_iter()
            .find(|(k, _)| k == b"event")
            .map(|(_, v)| v)
            .unwrap_or_default();
        let acker = Acker {
            shared: self.shared.clone(),
            acks: self.acks.clone(),
            in_flight: self.in_flight.clone(),
            group: self.group.clone(),
            stream_key: key.clone(),
            entry_id: id,
            is_retry,
            topic: topic.clone(),
            event_type,
            event_json,
            attempt,
            first_attempt_at,
            last_error: last_error.clone(),
            handed_out: false,
            settled: false,
        };
        match decoded {
            Ok(event) => Ok(Pending {
                info: DeliveryInfo {
                    topic: Some(topic.into()),
                    group: self.options.group.as_str().into(),
                    attempt,
                    first_attempt_at,
                    last_error,
                },
                event,
                acker,
            }),
            Err(reason) => Err((acker, reason)),
        }
    }
}

/// An envelope that carries the raw `event` bytes of an unreadable entry into the
/// dead-letter queue, under the entry's type if that is a valid one.
fn invalid_envelope(acker: &Acker) -> Result<EventEnvelope> {
    let make = |t: &str| {
        EventEnvelope::from_bytes(t, "application/octet-stream", acker.event_json.clone())
    };
    let envelope = if validate_event_type(&acker.event_type).is_ok() {
        make(&acker.event_type)?
    } else {
        make(INVALID_EVENT_TYPE)?
    };
    envelope.with_header("redisentryid", acker.entry_id.clone())
}
