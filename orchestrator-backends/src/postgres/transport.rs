//! [`PostgresTransport`]: competing consumers on a queue table, and its dead-letter table.
//!
//! A publish writes one row per consumer group whose patterns match the topic (the patterns
//! are kept as regular expressions in `transport_subscriptions`) and notifies the
//! transport's channel, in one statement. Consumers claim due rows of their group with
//! `FOR UPDATE SKIP LOCKED`, setting `locked_until` (the visibility timeout): an ack deletes
//! the row, a nack makes it due again after its delay, a dead letter moves it to
//! `dead_letters`, and a row whose consumer went away comes back when `locked_until` passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use orchestrator_core::envelope::validate_event_type;
use orchestrator_core::transport::{Acknowledge, DeliveryInfo, validate_group, validate_topic};
use orchestrator_core::{
    DeadLetter, DeadLetterQuery, DeadLetterQueue, Delivery, DeliveryStream, Error, EventEnvelope,
    Result, SubscribeOptions, Transport, cloudevents,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::config::{PostgresConfig, quote_ident};
use super::conn::{BACKEND, check_text, client, pg_error};
use super::follow::Notifier;
use super::schema::migrate;

/// The type given to the dead letter of a row that holds no valid event.
const INVALID_EVENT_TYPE: &str = "orchestrator.invalid";

/// How long a claimed row stays invisible to other consumers unless settled.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`Transport`] on PostgreSQL: see the [module docs](super#the-transport).
///
/// ```no_run
/// use orchestrator_backends::postgres::{PostgresConfig, PostgresTransport};
/// use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let config = PostgresConfig::new("postgres://postgres@127.0.0.1:5432/test")?;
/// let transport = PostgresTransport::connect(config).await?;
/// let mut orders = transport.subscribe(SubscribeOptions::new("billing", "order.#")?).await?;
/// transport.publish("order.placed", EventEnvelope::new("order.placed", &"o-1")?).await?;
/// if let Some(delivery) = orders.next().await? {
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresTransport {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// For consumers' statements (claims and settling): its sessions commit without
    /// waiting for the WAL flush (see [`run_statement`]).
    consumer_pool: Pool,
    config: PostgresConfig,
    channel: String,
    notifier: Notifier,
    /// The visibility timeout in milliseconds, read at each claim.
    visibility_ms: AtomicU64,
    sql: Sql,
    dlq: Arc<PostgresDeadLetterQueue>,
}

struct Sql {
    subscribe: String,
    publish: String,
    redeliver: String,
    claim: String,
    next_due: String,
    ack: String,
    nack: String,
    release: String,
    dead_letter: String,
    drop_subscriptions: String,
    drop_rows: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = quote_ident(schema);
        let q = format!("{s}.transport_queue");
        Self {
            subscribe: format!(
                "INSERT INTO {s}.transport_subscriptions (group_name, pattern, regex, ephemeral) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (group_name, pattern) DO NOTHING"
            ),
            // One row per matching group, in the order of the events, and a notification
            // at commit (the statement is its own transaction).
            publish: format!(
                "WITH ins AS (INSERT INTO {q} (group_name, topic, event) \
                   SELECT g.group_name, $1, u.ev \
                   FROM unnest($2::text[]) WITH ORDINALITY AS u(ev, n) \
                   CROSS JOIN (SELECT DISTINCT group_name FROM {s}.transport_subscriptions \
                               WHERE $1 ~ regex) g \
                   ORDER BY u.n, g.group_name RETURNING 1) \
                 SELECT pg_notify($3, '') FROM (SELECT 1 FROM ins LIMIT 1) x"
            ),
            redeliver: format!(
                "WITH ins AS (INSERT INTO {q} (group_name, topic, event) VALUES ($1, $2, $3) \
                   RETURNING 1) \
                 SELECT pg_notify($4, '') FROM ins"
            ),
            // A row claimed before whose lock ran out comes back as its next attempt.
            claim: format!(
                "WITH c AS (SELECT id FROM {q} WHERE group_name = $1 AND not_before <= now() \
                   AND (locked_until IS NULL OR locked_until <= now()) \
                   ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE {q} t SET locked_until = now() + make_interval(secs => $3), \
                   attempt = CASE WHEN t.locked_until IS NULL THEN t.attempt ELSE t.attempt + 1 END \
                 FROM c WHERE t.id = c.id \
                 RETURNING t.id, t.topic, t.event, t.attempt, t.first_attempt_at, t.last_error"
            ),
            next_due: format!(
                "SELECT extract(epoch FROM min(greatest(not_before, coalesce(locked_until, \
                 not_before))) - now())::float8 FROM {q} WHERE group_name = $1"
            ),
            ack: format!("DELETE FROM {q} WHERE id = ANY($1)"),
            // Both notify, so that idle consumers of the group look again for the next row
            // to fall due.
            nack: format!(
                "WITH u AS (UPDATE {q} SET attempt = attempt + 1, last_error = $2, \
                   locked_until = NULL, not_before = now() + make_interval(secs => $3) \
                   WHERE id = $1 RETURNING 1) \
                 SELECT pg_notify($4, '') FROM u"
            ),
            release: format!(
                "WITH u AS (UPDATE {q} SET attempt = attempt + 1, locked_until = NULL \
                   WHERE id = $1 RETURNING 1) \
                 SELECT pg_notify($2, '') FROM u"
            ),
            dead_letter: format!(
                "WITH d AS (DELETE FROM {q} WHERE id = $1) \
                 INSERT INTO {s}.dead_letters (id, event_type, subscription, letter) \
                 VALUES ($2, $3, $4, $5)"
            ),
            drop_subscriptions: format!(
                "DELETE FROM {s}.transport_subscriptions WHERE group_name = $1"
            ),
            drop_rows: format!("DELETE FROM {q} WHERE group_name = $1"),
        }
    }
}

impl std::fmt::Debug for PostgresTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresTransport")
            .field("url", &self.inner.config.redacted_url())
            .field("schema", &self.inner.config.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresTransport {
    /// Connects, creates or migrates the schema's tables (the store's and the transport's),
    /// and opens a pool. Consumers share one more connection, for `LISTEN`.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        let pool = config.pool()?;
        let consumer_pool = config.pool_committing_without_flush_wait()?;
        let mut conn = client(&pool).await?;
        let key = migrate(&mut conn, &config.schema).await?;
        drop(conn);
        let channel = format!("orchestrator_transport_{:08x}", key.cast_unsigned());
        let dlq = Arc::new(PostgresDeadLetterQueue {
            pool: pool.clone(),
            schema: quote_ident(&config.schema),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                notifier: Notifier::new(
                    config.pg_config(),
                    config.connector.clone(),
                    channel.clone(),
                ),
                sql: Sql::new(&config.schema),
                visibility_ms: AtomicU64::new(millis(DEFAULT_VISIBILITY_TIMEOUT)),
                pool,
                consumer_pool,
                config,
                channel,
                dlq,
            }),
        })
    }

    /// How long a delivery stays claimed without being settled before its row is delivered
    /// again, to any consumer of the group, as its next attempt (default
    /// [`DEFAULT_VISIBILITY_TIMEOUT`], at least 100 ms). Handlers that take longer than this
    /// see their events twice. Applies to every clone of the transport, from its next claim.
    pub fn with_visibility_timeout(self, timeout: Duration) -> Self {
        self.inner.visibility_ms.store(
            millis(timeout.max(Duration::from_millis(100))),
            Ordering::Relaxed,
        );
        self
    }

    /// Closes the connection pool: consumers' streams end (after the deliveries already
    /// handed to them), and every later call fails with
    /// [`Error::Closed`](orchestrator_core::Error::Closed). Unsettled deliveries come back
    /// to the group when their visibility timeout passes.
    pub async fn close(&self) {
        self.inner.pool.close();
        self.inner.consumer_pool.close();
    }

    /// The `NOTIFY` channel publishes wake consumers on.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The transport's [`PostgresDeadLetterQueue`].
    pub fn dead_letters(&self) -> Arc<PostgresDeadLetterQueue> {
        self.inner.dlq.clone()
    }

    async fn insert(&self, topic: &str, events: &[EventEnvelope]) -> Result<()> {
        validate_topic(topic)?;
        check_text("topic", topic)?;
        let mut jsons = Vec::with_capacity(events.len());
        for event in events {
            let json = String::from_utf8(cloudevents::encode(event)?)
                .map_err(|_| Error::encode("a CloudEvents encoding is not UTF-8"))?;
            self.inner.config.max_event_size.check_len(json.len())?;
            jsons.push(json);
        }
        if jsons.is_empty() {
            return Ok(());
        }
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.publish)
            .await
            .map_err(pg_error)?;
        conn.execute(&statement, &[&topic, &jsons, &self.inner.channel])
            .await
            .map_err(pg_error)?;
        Ok(())
    }
}

#[async_trait]
impl Transport for PostgresTransport {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        self.insert(topic, std::slice::from_ref(&event)).await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        self.insert(topic, &events).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>> {
        validate_group(&options.group)?;
        check_text("consumer group", &options.group)?;
        if options.patterns.is_empty() {
            return Err(Error::invalid("patterns", "a subscription needs a pattern"));
        }
        let wakeups = self.inner.notifier.watch().await?;
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.subscribe)
            .await
            .map_err(pg_error)?;
        for pattern in &options.patterns {
            check_text("pattern", pattern.as_str())?;
            conn.execute(
                &statement,
                &[
                    &options.group,
                    &pattern.as_str(),
                    &pattern.to_regex(),
                    &options.ephemeral,
                ],
            )
            .await
            .map_err(pg_error)?;
        }
        drop(conn);
        let prefetch = options.prefetch.clamp(1, 1000);
        let (tx, rx) = mpsc::channel(prefetch);
        let group: Arc<str> = Arc::from(options.group.as_str());
        let acks = AckBatcher::new(self.inner.clone());
        tokio::spawn(fetch(
            self.inner.clone(),
            group.clone(),
            prefetch,
            wakeups,
            tx,
            acks,
        ));
        Ok(Box::new(PostgresDeliveryStream {
            rx,
            inner: self.inner.clone(),
            group,
            ephemeral: options.ephemeral,
        }))
    }

    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_group(group)?;
        validate_topic(topic)?;
        check_text("consumer group", group)?;
        check_text("topic", topic)?;
        let json = String::from_utf8(cloudevents::encode(&event)?)
            .map_err(|_| Error::encode("a CloudEvents encoding is not UTF-8"))?;
        self.inner.config.max_event_size.check_len(json.len())?;
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.redeliver)
            .await
            .map_err(pg_error)?;
        conn.execute(&statement, &[&group, &topic, &json, &self.inner.channel])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        self.inner.dlq.clone()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Claims due rows of `group` and hands them to the consumer, until the consumer is gone.
async fn fetch(
    inner: Arc<Inner>,
    group: Arc<str>,
    prefetch: usize,
    mut wakeups: watch::Receiver<u64>,
    tx: mpsc::Sender<Delivery>,
    acks: Arc<AckBatcher>,
) {
    let mut failures = 0u32;
    // Claim once the consumer has room for half the prefetch: claiming each slot as it
    // frees would run a claim (a transaction) per delivery while the consumer keeps up.
    let refill = prefetch.div_ceil(2);
    loop {
        if tx.is_closed() || inner.consumer_pool.is_closed() {
            return;
        }
        if tx.capacity() < refill {
            // The permits go back when dropped: only this task sends, so the room stays.
            if tx.reserve_many(refill).await.is_err() {
                return;
            }
        }
        // Claim no more than the consumer has room for: claimed rows wait in the channel.
        let room = tx.capacity().max(1).min(prefetch);
        wakeups.borrow_and_update();
        match claim(&inner, &group, room, &acks).await {
            Ok(deliveries) if !deliveries.is_empty() => {
                failures = 0;
                for delivery in deliveries {
                    if tx.send(delivery).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Ok(_) => failures = 0,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, group = %group, "postgres transport: cannot claim rows; retrying");
            }
        }
        let mut wait = inner.config.poll_interval;
        if failures == 0
            && let Ok(Some(due)) = next_due(&inner, &group).await
        {
            wait = wait.min(due);
        } else if failures > 0 {
            wait = Duration::from_millis(100u64.saturating_mul(u64::from(failures.min(20))));
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = wakeups.changed() => {
                if changed.is_err() {
                    // The listener stopped: poll only.
                    tokio::time::sleep(wait).await;
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// How long until a row of `group` becomes due, if it has any.
async fn next_due(inner: &Inner, group: &str) -> Result<Option<Duration>> {
    let conn = client(&inner.consumer_pool).await?;
    let statement = conn
        .prepare_cached(&inner.sql.next_due)
        .await
        .map_err(pg_error)?;
    let rows = run_statement(&conn, Planning::EachTime, &statement, &[&group]).await?;
    Ok(rows
        .first()
        .and_then(|row| row.get::<_, Option<f64>>(0))
        .map(|secs| Duration::from_secs_f64(secs.clamp(0.0, 3600.0))))
}

async fn claim(
    inner: &Arc<Inner>,
    group: &Arc<str>,
    room: usize,
    acks: &Arc<AckBatcher>,
) -> Result<Vec<Delivery>> {
    let conn = client(&inner.consumer_pool).await?;
    let statement = conn
        .prepare_cached(&inner.sql.claim)
        .await
        .map_err(pg_error)?;
    let limit = i64::try_from(room).unwrap_or(1);
    let group_name: &str = group;
    // Milliseconds as seconds: exact enough for a lock that lasts at least 100 ms.
    #[allow(clippy::cast_precision_loss)]
    let visibility = inner.visibility_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    let rows = run_statement(
        &conn,
        Planning::EachTime,
        &statement,
        &[&group_name, &limit, &visibility],
    )
    .await?;
    drop(conn);
    let mut rows: Vec<_> = rows
        .iter()
        .map(|row| {
            (
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, i32>(3),
                row.get::<_, DateTime<Utc>>(4),
                row.get::<_, Option<String>>(5),
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    let mut out = Vec::with_capacity(rows.len());
    for (id, topic, json, attempt, first_attempt_at, last_error) in rows {
        let attempt = u32::try_from(attempt).unwrap_or(1);
        let acker = PgAck {
            inner: inner.clone(),
            acks: acks.clone(),
            id,
            settled: false,
        };
        match inner.config.max_event_size.decode(json.as_bytes()) {
            Ok(event) => {
                let topic_shared = (event.event_type() != topic).then(|| Arc::from(topic.as_str()));
                out.push(Delivery::new(
                    event,
                    DeliveryInfo {
                        topic: topic_shared,
                        group: group.clone(),
                        attempt,
                        first_attempt_at,
                        last_error,
                    },
                    Box::new(acker),
                ));
            }
            Err(reason) => {
                // Not a valid event: parked with the reason, never handed out.
                let event_type = if validate_event_type(&topic).is_ok() {
                    topic.as_str()
                } else {
                    INVALID_EVENT_TYPE
                };
                let envelope = EventEnvelope::from_bytes(
                    event_type,
                    "application/octet-stream",
                    json.into_bytes(),
                )?;
                let letter = DeadLetter::new(
                    envelope,
                    topic,
                    group.to_string(),
                    reason.to_string(),
                    attempt,
                    first_attempt_at,
                    Utc::now(),
                );
                tracing::warn!(group = %group, letter = %letter.id, "dead-lettering a row that holds no valid event");
                Box::new(acker).dead_letter(letter).await?;
            }
        }
    }
    Ok(out)
}

/// The acks of one subscription, deleted in batches: an ack that finds no delete in flight
/// deletes its row at once, in its own task; acks that come while a delete is in flight wait,
/// and go together in the next one (`DELETE … WHERE id = ANY($1)`), run by a task started
/// when the delete in flight is done. Each ack is answered once the transaction that deleted
/// its row has committed, or with the error that stopped it (its row then comes back at once,
/// as the delivery is dropped unsettled, or when its lock runs out).
struct AckBatcher {
    inner: Arc<Inner>,
    state: std::sync::Mutex<AckState>,
}

/// An ack waiting for the next delete.
type Waiting = (i64, oneshot::Sender<Result<()>>);

#[derive(Default)]
struct AckState {
    /// Whether a delete is in flight (whoever runs it takes the waiting acks next).
    running: bool,
    waiting: Vec<Waiting>,
}

/// At most this many rows go in one delete.
const MAX_ACK_BATCH: usize = 1000;

impl AckBatcher {
    fn new(inner: Arc<Inner>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            state: std::sync::Mutex::new(AckState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AckState> {
        // The state is whole even if a thread panicked holding the lock (nothing under it
        // can panic).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the row `id`, alone or with others; returns once it is deleted.
    async fn ack(self: &Arc<Self>, id: i64) -> Result<()> {
        let answer = {
            let mut state = self.state();
            if state.running {
                let (done, answer) = oneshot::channel();
                state.waiting.push((id, done));
                Some(answer)
            } else {
                state.running = true;
                None
            }
        };
        if let Some(answer) = answer {
            return answer.await.unwrap_or_else(|_| {
                Err(Error::backend(
                    BACKEND,
                    true,
                    "the ack was dropped before its row was deleted; the delivery comes again",
                ))
            });
        }
        // This ack runs the delete. If it is cancelled, the guard hands the acks that wait
        // to a task of their own.
        let mut guard = Runner {
            batcher: self.clone(),
            armed: true,
        };
        let own = delete_rows(&self.inner, &[id]).await;
        guard.armed = false;
        let next = self.take_waiting();
        if !next.is_empty() {
            // Those that came meanwhile are deleted by a task, so that this ack returns now.
            tokio::spawn(self.clone().drain(next));
        }
        own
    }

    /// The waiting acks (up to [`MAX_ACK_BATCH`]); if none, no delete is in flight from now.
    fn take_waiting(&self) -> Vec<Waiting> {
        let mut state = self.state();
        if state.waiting.is_empty() {
            state.running = false;
            return Vec::new();
        }
        let take = state.waiting.len().min(MAX_ACK_BATCH);
        state.waiting.drain(..take).collect()
    }

    /// Deletes batch after batch until no ack waits.
    async fn drain(self: Arc<Self>, mut batch: Vec<Waiting>) {
        let mut ids = Vec::new();
        while !batch.is_empty() {
            ids.clear();
            ids.extend(batch.iter().map(|(id, _)| *id));
            let deleted = delete_rows(&self.inner, &ids).await;
            for (_, done) in batch.drain(..) {
                let answer = match &deleted {
                    Ok(()) => Ok(()),
                    Err(error) => Err(Error::backend(
                        BACKEND,
                        error.is_temporary(),
                        format!("the ack was not recorded: {error}"),
                    )),
                };
                // An ack that stopped waiting has nobody to tell.
                let _ = done.send(answer);
            }
            batch = self.take_waiting();
        }
    }
}

/// The ack running a delete: if it is dropped before the delete is done, the acks that wait
/// are handed to a task (they would otherwise wait for a runner that is gone).
struct Runner {
    batcher: Arc<AckBatcher>,
    armed: bool,
}

impl Drop for Runner {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let next = self.batcher.take_waiting();
        if next.is_empty() {
            return;
        }
        // Without a runtime their senders drop, and those acks fail (the rows come again).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.batcher.clone().drain(next));
        }
    }
}

/// Deletes the acked rows `ids` in one transaction.
async fn delete_rows(inner: &Inner, ids: &[i64]) -> Result<()> {
    let conn = client(&inner.consumer_pool).await?;
    let statement = conn
        .prepare_cached(&inner.sql.ack)
        .await
        .map_err(pg_error)?;
    without_flush_wait(&conn, &statement, &[&ids]).await?;
    Ok(())
}

/// Settles one claimed row; a delivery dropped unsettled releases its row.
struct PgAck {
    inner: Arc<Inner>,
    /// The subscription's acks.
    acks: Arc<AckBatcher>,
    id: i64,
    settled: bool,
}

impl PgAck {
    async fn run(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<()> {
        let conn = client(&self.inner.consumer_pool).await?;
        let statement = conn.prepare_cached(sql).await.map_err(pg_error)?;
        without_flush_wait(&conn, &statement, params).await?;
        self.settled = true;
        Ok(())
    }
}

/// How the server plans a consumer's statement.
#[derive(Clone, Copy)]
enum Planning {
    /// The session's default: a prepared statement's generic plan, once the server finds it
    /// no worse than custom ones (the settling statements, which find one row by its key).
    Cached,
    /// Planned for its parameters at each run (`plan_cache_mode = force_custom_plan`), for
    /// the statements that scan a group's rows (the claim, the next due time): the queue's
    /// size changes by orders of magnitude within a session, and a generic plan made while
    /// it was nearly empty (a sequential scan) would be kept. Measured on the fault suite's
    /// crash run: claims fell to about 530 rows/s with a 170k-row backlog until the cached
    /// plans were invalidated, then ran at about 5,000/s. Only for these: planning each
    /// delete again made acks dearer.
    EachTime,
}

/// Runs a consumer's statement (a claim, an ack, a nack, a release, a dead letter) like
/// [`run_statement`] with cached plans.
async fn without_flush_wait(
    conn: &deadpool_postgres::Object,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>> {
    run_statement(conn, Planning::Cached, statement, params).await
}

/// Runs a consumer's statement on a connection of the consumers' pool, whose sessions commit
/// without waiting for the WAL flush (`synchronous_commit = off`), in one round trip. Safe
/// because losing such a commit
/// in a server crash loses no message: the transaction is lost whole, so the row is back as
/// it was — claimable again, to be delivered once more, which at-least-once delivery
/// allows. Publishes wait for the flush.
async fn run_statement(
    conn: &deadpool_postgres::Object,
    planning: Planning,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>> {
    if let Planning::Cached = planning {
        // One statement, its own transaction: one round trip, and the least work for the
        // server.
        return conn.query(statement, params).await.map_err(pg_error);
    }
    // Queued on the connection together at the first poll, so a caller that goes away
    // cannot leave the transaction open.
    let (_, rows, _) = futures::try_join!(
        conn.batch_execute("BEGIN; SET LOCAL plan_cache_mode TO force_custom_plan"),
        conn.query(statement, params),
        conn.batch_execute("COMMIT"),
    )
    .map_err(pg_error)?;
    Ok(rows)
}

#[async_trait]
impl Acknowledge for PgAck {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.acks.ack(self.id).await?;
        self.settled = true;
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration, reason: String) -> Result<()> {
        let inner = self.inner.clone();
        let id = self.id;
        let reason = reason.replace('\0', "\u{fffd}");
        let secs = delay.as_secs_f64().min(1e9);
        self.run(&inner.sql.nack, &[&id, &reason, &secs, &inner.channel])
            .await
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let inner = self.inner.clone();
        let id = self.id;
        let json = String::from_utf8(letter.to_json()?)
            .map_err(|_| Error::encode("a dead letter's JSON is not UTF-8"))?
            .replace('\0', "\u{fffd}");
        let event_type = letter.event.event_type().to_owned();
        self.run(
            &inner.sql.dead_letter,
            &[&id, &letter.id, &event_type, &letter.subscription, &json],
        )
        .await
    }
}

impl Drop for PgAck {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Unsettled: the row is due again now, as its next attempt (if this fails, the
        // visibility timeout brings it back).
        let (inner, id) = (self.inner.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let released = async {
                    let conn = client(&inner.consumer_pool).await?;
                    let statement = conn
                        .prepare_cached(&inner.sql.release)
                        .await
                        .map_err(pg_error)?;
                    without_flush_wait(&conn, &statement, &[&id, &inner.channel])
                        .await
                        .map(drop)
                };
                if let Err(error) = released.await {
                    tracing::warn!(%error, "postgres transport: cannot release a delivery; its lock will run out");
                }
            });
        }
    }
}

/// A consumer's deliveries.
struct PostgresDeliveryStream {
    rx: mpsc::Receiver<Delivery>,
    inner: Arc<Inner>,
    group: Arc<str>,
    ephemeral: bool,
}

#[async_trait]
impl DeliveryStream for PostgresDeliveryStream {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.rx.recv().await)
    }

    async fn next_batch(&mut self, max: usize, into: &mut Vec<Delivery>) -> Result<bool> {
        let Some(first) = self.rx.recv().await else {
            return Ok(false);
        };
        into.push(first);
        while into.len() < max.max(1) {
            match self.rx.try_recv() {
                Ok(delivery) => into.push(delivery),
                Err(_) => break,
            }
        }
        Ok(true)
    }
}

impl Drop for PostgresDeliveryStream {
    fn drop(&mut self) {
        if !self.ephemeral {
            return;
        }
        let (inner, group) = (self.inner.clone(), self.group.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let dropped = async {
                    let mut conn = client(&inner.pool).await?;
                    let tx = conn.transaction().await.map_err(pg_error)?;
                    let group: &str = &group;
                    for sql in [&inner.sql.drop_subscriptions, &inner.sql.drop_rows] {
                        tx.execute(sql.as_str(), &[&group]).await.map_err(pg_error)?;
                    }
                    tx.commit().await.map_err(pg_error)
                };
                if let Err(error) = dropped.await {
                    tracing::warn!(%error, group = %group, "postgres transport: cannot remove an ephemeral group");
                }
            });
        }
    }
}

/// The durable [`DeadLetterQueue`] of a [`PostgresTransport`]: rows of
/// `<schema>.dead_letters`, oldest first.
#[derive(Debug)]
pub struct PostgresDeadLetterQueue {
    pool: Pool,
    schema: String,
}

impl PostgresDeadLetterQueue {
    fn decode(json: &str) -> Result<DeadLetter> {
        DeadLetter::from_json(json.as_bytes())
    }
}

#[async_trait]
impl DeadLetterQueue for PostgresDeadLetterQueue {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn push(&self, letter: DeadLetter) -> Result<()> {
        let json = String::from_utf8(letter.to_json()?)
            .map_err(|_| Error::encode("a dead letter's JSON is not UTF-8"))?
            .replace('\0', "\u{fffd}");
        check_text("dead letter id", &letter.id)?;
        let conn = client(&self.pool).await?;
        conn.execute(
            &format!(
                "INSERT INTO {}.dead_letters (id, event_type, subscription, letter) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET letter = EXCLUDED.letter",
                self.schema
            ),
            &[
                &letter.id,
                &letter.event.event_type(),
                &letter.subscription.replace('\0', "\u{fffd}"),
                &json,
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let conn = client(&self.pool).await?;
        let event_type = query.event_type.as_deref().filter(|t| !t.contains('\0'));
        let subscription = query.subscription.as_deref().filter(|t| !t.contains('\0'));
        if event_type.is_none() != query.event_type.is_none()
            || subscription.is_none() != query.subscription.is_none()
        {
            return Ok(Vec::new());
        }
        let rows = conn
            .query(
                &format!(
                    "SELECT letter FROM {}.dead_letters \
                     WHERE ($1::text IS NULL OR event_type = $1) \
                     AND ($2::text IS NULL OR subscription = $2) \
                     ORDER BY seq OFFSET $3 LIMIT $4",
                    self.schema
                ),
                &[
                    &event_type,
                    &subscription,
                    &i64::try_from(query.offset).unwrap_or(i64::MAX),
                    &i64::try_from(query.limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(|row| Self::decode(row.get(0))).collect()
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        if id.contains('\0') {
            return Ok(None);
        }
        let conn = client(&self.pool).await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT letter FROM {}.dead_letters WHERE id = $1",
                    self.schema
                ),
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        row.map(|row| Self::decode(row.get(0))).transpose()
    }

    async fn remove(&self, id: &str) -> Result<Option<DeadLetter>> {
        if id.contains('\0') {
            return Ok(None);
        }
        let conn = client(&self.pool).await?;
        let row = conn
            .query_opt(
                &format!(
                    "DELETE FROM {}.dead_letters WHERE id = $1 RETURNING letter",
                    self.schema
                ),
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        row.map(|row| Self::decode(row.get(0))).transpose()
    }

    async fn len(&self) -> Result<usize> {
        let conn = client(&self.pool).await?;
        let row = conn
            .query_one(
                &format!("SELECT count(*) FROM {}.dead_letters", self.schema),
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
}
