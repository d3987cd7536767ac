//! [`PostgresEventStore`]: every event one row of `<schema>.events`.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Utc};
use deadpool_postgres::Pool;
use orchestrator_core::store::{find_retried_append, validate_batch_ids, validate_stream_id};
use orchestrator_core::{
    AppendResult, Error, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    Inbox, Lease, ReadAll, Result, StoreCapabilities, StoredPosition, cloudevents,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::config::{PostgresConfig, quote_ident};
use super::conn::{BACKEND, clamp_i64, client, pg_error, to_i64, to_u64};
use super::follow::Notifier;
use super::schema::{APPEND_LOCK_CLASS, migrate};
use super::{PostgresInbox, PostgresLease};

/// How many rows one read fetches at most.
pub(crate) const PAGE: usize = 1000;

/// How long a lease of the store lasts without renewal.
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// An [`EventStore`] on PostgreSQL: one row per event in `<schema>.events`, global positions
/// assigned in commit order under an advisory lock, subscriptions woken by `LISTEN/NOTIFY`.
///
/// See the [module docs](super) for the tables, the gap-free global order and its cost.
///
/// ```no_run
/// use orchestrator_backends::postgres::{PostgresConfig, PostgresEventStore};
/// use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let config = PostgresConfig::new("postgres://postgres@127.0.0.1:5432/test")?;
/// let store = PostgresEventStore::connect(config).await?;
/// let placed = EventEnvelope::new("order.placed", &serde_json::json!({"id": "o-1"}))?;
/// store.append("order-o-1", ExpectedVersion::NoStream, vec![placed]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresEventStore {
    pub(crate) inner: Arc<Inner>,
}

/// What clones of a store share.
pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) config: PostgresConfig,
    /// The schema's `hashtext`: the second key of the append lock.
    pub(crate) lock_key: i32,
    /// The `NOTIFY` channel of this schema's appends.
    pub(crate) channel: String,
    pub(crate) sql: Sql,
    pub(crate) notifier: Notifier,
    inbox: Arc<PostgresInbox>,
}

/// The statements, with the schema filled in.
pub(crate) struct Sql {
    state: String,
    ids: String,
    insert: String,
    read_stream: String,
    pub(crate) read_all: String,
    stream_version: String,
    head: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let t = format!("{}.events", quote_ident(schema));
        Self {
            state: format!(
                "SELECT (SELECT max(stream_version) FROM {t} WHERE stream_id = $1), \
                        (SELECT coalesce(max(position), 0) FROM {t})"
            ),
            ids: format!(
                "SELECT event_id, stream_version, position FROM {t} \
                 WHERE stream_id = $1 AND event_id = ANY($2)"
            ),
            insert: format!(
                "INSERT INTO {t} \
                 (position, stream_id, stream_version, event_id, event_type, event_time, event) \
                 SELECT p, $1, v, i, ty, tm, e::json \
                 FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], \
                             $6::timestamptz[], $7::text[]) AS u(p, v, i, ty, tm, e)"
            ),
            read_stream: format!(
                "SELECT event::text FROM {t} WHERE stream_id = $1 AND stream_version >= $2 \
                 ORDER BY stream_version LIMIT $3"
            ),
            // The time bounds are loose (`<=`: timestamptz keeps microseconds, events keep
            // nanoseconds); the exact filter runs on the decoded events.
            read_all: format!(
                "SELECT position, event::text FROM {t} WHERE position >= $1 \
                 AND ($2::text[] IS NULL OR event_type = ANY($2)) \
                 AND ($3::timestamptz IS NULL OR event_time >= $3) \
                 AND ($4::timestamptz IS NULL OR event_time <= $4) \
                 AND ($5::text IS NULL OR starts_with(stream_id, $5)) \
                 ORDER BY position LIMIT $6"
            ),
            stream_version: format!("SELECT max(stream_version) FROM {t} WHERE stream_id = $1"),
            head: format!("SELECT coalesce(max(position), 0) FROM {t}"),
        }
    }
}

impl std::fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("url", &self.inner.config.redacted_url())
            .field("schema", &self.inner.config.schema)
            .finish_non_exhaustive()
    }
}

/// One event of an append, encoded before the lock is taken.
struct Prepared {
    id: String,
    event_type: String,
    time: DateTime<Utc>,
    /// The CloudEvents JSON without its closing `}`: the positions are added under the lock.
    open_json: String,
}

impl PostgresEventStore {
    /// Connects to PostgreSQL, creates the schema and its tables or migrates them to this
    /// build's version (safe when several processes start at once), and opens a pool of
    /// connections. Subscriptions share one more connection, for `LISTEN`, opened with the
    /// first of them.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        let pool = config.pool()?;
        let mut conn = client(&pool).await?;
        let lock_key = migrate(&mut conn, &config.schema).await?;
        drop(conn);
        let channel = format!("orchestrator_events_{:08x}", lock_key.cast_unsigned());
        let inbox = Arc::new(PostgresInbox::on_pool(pool.clone(), config.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                sql: Sql::new(&config.schema),
                notifier: Notifier::new(config.pg_config(), channel.clone()),
                pool,
                config,
                lock_key,
                channel,
                inbox,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The connection pool, for queries of your own beside the store's (e.g. a read model
    /// kept in the same database).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The `NOTIFY` channel every append of this store's schema notifies on commit, with the
    /// append's last global position as the payload.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Drops the store's schema and everything in it — its events, inbox, leases and any
    /// table of yours kept there. Meant for tests and teardown; the store is unusable after.
    pub async fn drop_schema(&self) -> Result<()> {
        let conn = client(&self.inner.pool).await?;
        conn.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&self.inner.config.schema)
        ))
        .await
        .map_err(pg_error)
    }

    /// Reads up to `limit` rows at or after `from` that may pass `filter` (the database's
    /// part of the filter), as (position, decoded event); the caller applies
    /// [`EventFilter::matches`].
    pub(crate) async fn scan(
        &self,
        from: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<(u64, Result<EventEnvelope>)>> {
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.read_all)
            .await
            .map_err(pg_error)?;
        let types = (!filter.event_types.is_empty()).then_some(&filter.event_types);
        // A bound outside the storable years bounds nothing stored: drop it from the SQL
        // (the exact filter still applies), which also keeps it within timestamptz's range.
        let from_time = filter.from_time.filter(|t| in_storable_range(*t));
        let to_time = filter.to_time.filter(|t| in_storable_range(*t));
        let rows = conn
            .query(
                &statement,
                &[
                    &clamp_i64(from.max(1)),
                    &types,
                    &from_time,
                    &to_time,
                    &filter.stream_prefix,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(|row| {
                let position = to_u64("position", row.get(0))?;
                let json: &str = row.get(1);
                Ok((position, cloudevents::decode(json.as_bytes())))
            })
            .collect()
    }
}

/// Whether `time` can be stored: its year is one RFC 3339 (the CloudEvents `time`) can
/// write, 0000 to 9999 — a narrower range than `timestamptz`'s (4713 BC to 294276 AD).
fn in_storable_range(time: DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

fn wrong_version(stream: &str, expected: ExpectedVersion, actual: Option<u64>) -> Error {
    Error::WrongExpectedVersion {
        stream: stream.to_owned(),
        expected,
        actual,
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// Everything: versions and event ids are checked in the append's transaction (and
    /// unique constraints back both), a batch is one transaction, and events are as durable
    /// as PostgreSQL's commits.
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
        let inner = &*self.inner;
        inner.config.max_event_size.check_append(stream, &events)?;
        let mut prepared = Vec::with_capacity(events.len());
        for event in &events {
            let event = event.clone().without_position().with_stream_id(stream);
            let mut json = String::from_utf8(cloudevents::encode(&event)?)
                .map_err(|_| Error::encode("a CloudEvents encoding is not UTF-8"))?;
            if json.pop() != Some('}') {
                return Err(Error::encode("a CloudEvents encoding is not a JSON object"));
            }
            if !in_storable_range(event.time()) {
                return Err(Error::invalid(
                    "event time",
                    format!(
                        "event {}: {} is outside the years an RFC 3339 time (the \
                         CloudEvents `time`) can hold, 0000 to 9999",
                        event.id(),
                        event.time()
                    ),
                ));
            }
            prepared.push(Prepared {
                id: event.id().to_string(),
                event_type: event.event_type().to_owned(),
                time: event.time(),
                open_json: json,
            });
        }
        let ids: Vec<&str> = prepared.iter().map(|p| p.id.as_str()).collect();

        let mut conn = client(&inner.pool).await?;
        let (lock, state, lookup) = futures::try_join!(
            conn.prepare_cached("SELECT pg_advisory_xact_lock($1, $2)"),
            conn.prepare_cached(&inner.sql.state),
            conn.prepare_cached(&inner.sql.ids),
        )
        .map_err(pg_error)?;
        // Dropping the transaction unfinished (an error, a cancelled caller) rolls it back,
        // which releases the lock.
        let tx = conn.transaction().await.map_err(pg_error)?;
        // One round trip: the lock, then what the append decides on, read after the lock
        // so that every earlier append is visible.
        let lock_params: [&(dyn ToSql + Sync); 2] = [&APPEND_LOCK_CLASS, &inner.lock_key];
        let state_params: [&(dyn ToSql + Sync); 1] = [&stream];
        let (_, state, stored) = futures::try_join!(
            tx.execute(&lock, &lock_params),
            tx.query_one(&state, &state_params),
            async {
                if ids.is_empty() {
                    Ok(Vec::new())
                } else {
                    tx.query(&lookup, &[&stream, &ids]).await
                }
            },
        )
        .map_err(pg_error)?;
        let version = state
            .get::<_, Option<i64>>(0)
            .map(|v| to_u64("stream version", v))
            .transpose()?;
        let head = to_u64("position", state.get(1))?;

        if !stored.is_empty() {
            let mut at = HashMap::with_capacity(stored.len());
            for row in &stored {
                let id: String = row.get(0);
                let position = StoredPosition {
                    stream_version: to_u64("stream version", row.get(1))?,
                    global_position: to_u64("position", row.get(2))?,
                };
                at.insert(id, position);
            }
            if let Some(original) =
                find_retried_append(stream, expected, &events, |id| at.get(id.as_str()).copied())?
            {
                tx.rollback().await.map_err(pg_error)?;
                tracing::debug!(stream, events = events.len(), ?original, "retried append");
                return Ok(original);
            }
        }
        if !expected.is_satisfied_by(version) {
            return Err(wrong_version(stream, expected, version));
        }
        let current = version.unwrap_or(0);
        if prepared.is_empty() {
            return Ok(AppendResult {
                next_expected_version: current,
                first_position: head + 1,
                last_position: head,
            });
        }

        let count = prepared.len() as u64;
        let mut positions = Vec::with_capacity(prepared.len());
        let mut versions = Vec::with_capacity(prepared.len());
        let mut jsons = Vec::with_capacity(prepared.len());
        for (offset, event) in (1..).zip(&prepared) {
            let (version, position) = (current + offset, head + offset);
            positions.push(to_i64("global position", position)?);
            versions.push(to_i64("stream version", version)?);
            jsons.push(format!(
                "{},\"streamversion\":{version},\"globalposition\":{position}}}",
                event.open_json
            ));
        }
        let types: Vec<&str> = prepared.iter().map(|p| p.event_type.as_str()).collect();
        let times: Vec<DateTime<Utc>> = prepared.iter().map(|p| p.time).collect();
        let last_position = head + count;
        let (insert, notify) = futures::try_join!(
            tx.prepare_cached(&inner.sql.insert),
            tx.prepare_cached("SELECT pg_notify($1, $2)"),
        )
        .map_err(pg_error)?;
        let insert_params: [&(dyn ToSql + Sync); 7] =
            [&stream, &positions, &versions, &ids, &types, &times, &jsons];
        let payload = last_position.to_string();
        let notify_params: [&(dyn ToSql + Sync); 2] = [&inner.channel, &payload];
        let inserted = futures::try_join!(
            tx.execute(&insert, &insert_params),
            tx.execute(&notify, &notify_params),
        );
        if let Err(error) = inserted {
            drop(tx);
            // Under the lock no other append can take these versions; a writer that bypasses
            // it (SQL by hand) can, and the unique constraint stops it there.
            if error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                let actual = self.stream_version(stream).await?;
                return Err(wrong_version(stream, expected, actual));
            }
            return Err(pg_error(error));
        }
        tx.commit().await.map_err(pg_error)?;
        let result = AppendResult {
            next_expected_version: current + count,
            first_position: head + 1,
            last_position,
        };
        tracing::debug!(stream, events = events.len(), ?result, "appended");
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        validate_stream_id(stream)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.read_stream)
            .await
            .map_err(pg_error)?;
        let rows = conn
            .query(
                &statement,
                &[
                    &stream,
                    &clamp_i64(from_version.max(1)),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(|row| cloudevents::decode(row.get::<_, &str>(0).as_bytes()))
            .collect()
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        let mut out = Vec::new();
        let mut from = query.from_position.max(1);
        while out.len() < query.limit {
            let page = (query.limit - out.len()).min(PAGE);
            let rows = self.scan(from, &query.filter, page).await?;
            let full = rows.len() == page;
            for (position, event) in rows {
                from = position + 1;
                let event = event?;
                if query.filter.matches(&event) {
                    out.push(event);
                }
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.stream_version)
            .await
            .map_err(pg_error)?;
        let row = conn
            .query_one(&statement, &[&stream])
            .await
            .map_err(pg_error)?;
        row.get::<_, Option<i64>>(0)
            .map(|v| to_u64("stream version", v))
            .transpose()
    }

    async fn head_position(&self) -> Result<u64> {
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.head)
            .await
            .map_err(pg_error)?;
        let row = conn.query_one(&statement, &[]).await.map_err(pg_error)?;
        to_u64("position", row.get(0))
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        super::follow::subscribe(self.clone(), from_position, filter).await
    }

    /// A [`PostgresLease`] in a row of `<schema>.leases`, lasting 5 s without renewal: the
    /// processes sharing this store elect one holder.
    fn lease(&self, name: &str) -> Option<Arc<dyn Lease>> {
        Some(Arc::new(PostgresLease::on_pool(
            self.inner.pool.clone(),
            &self.inner.config.schema,
            name,
            LEASE_TTL,
        )))
    }

    /// The [`PostgresInbox`] in `<schema>.inbox`, with the default retention, on this store's
    /// pool; every call returns the same inbox.
    fn inbox(&self) -> Option<Arc<dyn Inbox>> {
        Some(self.inner.inbox.clone())
    }
}
