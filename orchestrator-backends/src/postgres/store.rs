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

use super::commit::{Committer, Prepared, Request};
use super::config::{PostgresConfig, quote_ident};
use super::conn::{BACKEND, check_text, clamp_i64, client, pg_error, to_u64};
use super::follow::Notifier;
use super::read_model::validate_name;
use super::schema::migrate;
use super::{PostgresInbox, PostgresLease, PostgresReadModelStore};

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
    /// The `NOTIFY` channel of this schema's appends.
    pub(crate) channel: String,
    pub(crate) sql: Sql,
    pub(crate) notifier: Notifier,
    inbox: Arc<PostgresInbox>,
    /// The group commit of this store's appends.
    committer: Committer,
}

/// The statements, with the schema filled in.
pub(crate) struct Sql {
    ids: String,
    read_stream: String,
    pub(crate) read_all: String,
    stream_version: String,
    head: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let t = format!("{}.events", quote_ident(schema));
        Self {
            ids: format!(
                "SELECT event_id, stream_version, position FROM {t} \
                 WHERE stream_id = $1 AND event_id = ANY($2)"
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
        let committer = Committer::new(
            pool.clone(),
            &quote_ident(&config.schema),
            lock_key,
            channel.clone(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                committer,
                sql: Sql::new(&config.schema),
                notifier: Notifier::new(
                    config.pg_config(),
                    config.connector.clone(),
                    channel.clone(),
                ),
                pool,
                config,
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

    /// The documents of the read model `name`, in this store's schema and on its pool: a
    /// [`PostgresReadModelStore`], whose projections are exactly-once. Fails only for an
    /// empty name or one with a NUL character.
    pub fn read_model_store(&self, name: impl Into<String>) -> Result<PostgresReadModelStore> {
        let name = validate_name(name.into())?;
        Ok(PostgresReadModelStore::on_pool(
            self.inner.pool.clone(),
            self.inner.config.clone(),
            name,
        ))
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
        decode_rows(&self.scan_rows(from, filter, limit).await?)
    }

    /// The rows [`scan`](Self::scan) decodes: `(position, event as text)`.
    async fn scan_rows(
        &self,
        from: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<tokio_postgres::Row>> {
        // Stored stream ids and types hold no NUL (PostgreSQL text cannot): a filter value
        // with one matches nothing, and is not sent.
        let types_sent: Vec<&String> = filter
            .event_types
            .iter()
            .filter(|t| !t.contains('\0'))
            .collect();
        if filter
            .stream_prefix
            .as_deref()
            .is_some_and(|p| p.contains('\0'))
            || (types_sent.is_empty() && !filter.event_types.is_empty())
        {
            return Ok(Vec::new());
        }
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.read_all)
            .await
            .map_err(pg_error)?;
        let types = (!types_sent.is_empty()).then_some(&types_sent);
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
        Ok(rows)
    }
}

/// Rows of [`PostgresEventStore::scan_rows`] as positions and events.
fn decode_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<(u64, Result<EventEnvelope>)>> {
    rows.iter()
        .map(|row| {
            let position = to_u64("position", row.get(0))?;
            let json: &str = row.get(1);
            Ok((position, cloudevents::decode(json.as_bytes())))
        })
        .collect()
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
            check_text("event id", event.id().as_str())?;
            prepared.push(Prepared {
                id: event.id().to_string(),
                event_type: event.event_type().to_owned(),
                time: event.time(),
                open_json: json,
            });
        }
        let (kind, exact): (i32, i64) = match expected {
            ExpectedVersion::Any => (0, 0),
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => (1, 0),
            ExpectedVersion::StreamExists => (2, 0),
            // Versions are bigints: one past i64::MAX is never reached (-1 matches none).
            ExpectedVersion::Exact(n) => (3, i64::try_from(n).unwrap_or(-1)),
        };
        // Queued for the next group commit, which checks and writes it under the append lock
        // as if it ran alone.
        let outcome = inner
            .committer
            .append(Request {
                stream: stream.to_owned(),
                kind,
                exact,
                events: prepared,
            })
            .await?;
        let version = outcome
            .version
            .map(|v| to_u64("stream version", v))
            .transpose()?;
        match outcome.status {
            0 => {
                let result = AppendResult {
                    next_expected_version: version.unwrap_or(0),
                    first_position: to_u64("position", outcome.first_position.unwrap_or(0))?,
                    last_position: to_u64("position", outcome.last_position.unwrap_or(0).max(0))?,
                };
                tracing::debug!(stream, events = events.len(), ?result, "appended");
                Ok(result)
            }
            1 => {
                // The stream holds some of the ids: a retry or a clash, which no later append
                // can change (rows are never rewritten), so it is told apart after the lock.
                let ids: Vec<String> = events.iter().map(|e| e.id().to_string()).collect();
                let conn = client(&inner.pool).await?;
                let lookup = conn
                    .prepare_cached(&inner.sql.ids)
                    .await
                    .map_err(pg_error)?;
                let stored = conn
                    .query(&lookup, &[&stream, &ids])
                    .await
                    .map_err(pg_error)?;
                let mut at = HashMap::with_capacity(stored.len());
                for row in &stored {
                    let position = StoredPosition {
                        stream_version: to_u64("stream version", row.get(1))?,
                        global_position: to_u64("position", row.get(2))?,
                    };
                    at.insert(row.get::<_, String>(0), position);
                }
                match find_retried_append(stream, expected, &events, |id| {
                    at.get(id.as_str()).copied()
                })? {
                    Some(original) => {
                        tracing::debug!(stream, events = events.len(), ?original, "retried append");
                        Ok(original)
                    }
                    None => Err(Error::backend(
                        BACKEND,
                        true,
                        format!("stream `{stream}`: the ids of an append vanished; try again"),
                    )),
                }
            }
            _ => Err(wrong_version(stream, expected, version)),
        }
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
        let mut page = query.limit.min(PAGE);
        if page == 0 {
            return Ok(out);
        }
        let mut rows = self.scan_rows(from, &query.filter, page).await?;
        loop {
            let full = rows.len() == page;
            if let Some(last) = rows.last() {
                from = to_u64("position", last.get(0))? + 1;
            }
            // The next page is asked for while this one is decoded, as big as the limit
            // allows if every row of this one matches (the exact filter may drop some, which
            // only leaves room for another page).
            let next_page = query.limit.saturating_sub(out.len() + rows.len()).min(PAGE);
            let ahead = full && next_page > 0;
            let filter = &query.filter;
            // The query is polled first, so that it is on its way before the decoding runs.
            let (next, decoded) = futures::join!(
                async move {
                    if ahead {
                        Some(self.scan_rows(from, filter, next_page).await)
                    } else {
                        None
                    }
                },
                async { decode_rows(&rows) },
            );
            for (_, event) in decoded? {
                let event = event?;
                if query.filter.matches(&event) {
                    out.push(event);
                }
            }
            if !full {
                break;
            }
            rows = match next {
                Some(next) => {
                    page = next_page;
                    next?
                }
                None => {
                    page = query.limit.saturating_sub(out.len()).min(PAGE);
                    if page == 0 {
                        break;
                    }
                    self.scan_rows(from, &query.filter, page).await?
                }
            };
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
