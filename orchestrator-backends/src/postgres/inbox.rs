//! [`PostgresInbox`]: a durable [`Inbox`] in the table `<schema>.inbox`, shared by every
//! process of a consumer group.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Pool;
use orchestrator_core::inbox::validate_group;
use orchestrator_core::{Clock, EventId, Inbox, InboxRetention, Result, SystemClock};

use super::config::{PostgresConfig, quote_ident};
use super::conn::{check_text, client, pg_error};
use super::schema::migrate;

/// A durable [`Inbox`] in PostgreSQL, for subscriptions whose de-duplication must survive
/// restarts and be shared by every process of a consumer group.
///
/// One row per handled id in `<schema>.inbox`: `(group_name, event_id)` is the key, `seq`
/// (an identity column) the record order for the count bound, `recorded_at` the record time
/// for the age bound. A record is one transaction that drops the group's ids past the age
/// bound, inserts the id unless present (`ON CONFLICT DO NOTHING`), and drops the group's
/// oldest ids past the count bound; `seen` is one indexed lookup.
///
/// Record times come from the inbox's [`Clock`] (the system clock by default), so the
/// processes sharing a group should have roughly synchronised clocks: the age bound is off by
/// their skew.
///
/// From [`PostgresEventStore::inbox`](orchestrator_core::EventStore::inbox) (the store's
/// schema and pool, the default retention) or [`PostgresInbox::connect`].
///
/// ```no_run
/// use orchestrator_backends::postgres::{PostgresConfig, PostgresInbox};
/// use orchestrator_core::{EventId, Inbox, InboxRetention};
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let config = PostgresConfig::new("postgres://postgres@127.0.0.1:5432/test")?;
/// let inbox = PostgresInbox::connect(config).await?.with_retention(InboxRetention::last(50_000));
/// let id = EventId::new();
/// inbox.record("billing", &id).await?;
/// assert!(inbox.seen("billing", &id).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresInbox {
    pool: Pool,
    config: PostgresConfig,
    retention: InboxRetention,
    clock: Arc<dyn Clock>,
    sql: Arc<InboxSql>,
}

struct InboxSql {
    seen: String,
    forget_old: String,
    insert: String,
    forget_over: String,
}

impl std::fmt::Debug for PostgresInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresInbox")
            .field("url", &self.config.redacted_url())
            .field("schema", &self.config.schema)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl PostgresInbox {
    /// Connects to PostgreSQL and creates or migrates the config's schema (as
    /// [`PostgresEventStore::connect`](super::PostgresEventStore::connect) does); the inbox
    /// keeps ids to the default [`InboxRetention`].
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        let pool = config.pool()?;
        migrate(&mut client(&pool).await?, &config.schema).await?;
        Ok(Self::on_pool(pool, config))
    }

    /// An inbox on an existing pool whose schema is migrated.
    pub(crate) fn on_pool(pool: Pool, config: PostgresConfig) -> Self {
        let t = format!("{}.inbox", quote_ident(&config.schema));
        let sql = InboxSql {
            seen: format!("SELECT recorded_at FROM {t} WHERE group_name = $1 AND event_id = $2"),
            forget_old: format!("DELETE FROM {t} WHERE group_name = $1 AND recorded_at < $2"),
            insert: format!(
                "INSERT INTO {t} (group_name, event_id, recorded_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (group_name, event_id) DO NOTHING"
            ),
            forget_over: format!(
                "DELETE FROM {t} WHERE group_name = $1 AND seq <= \
                 (SELECT seq FROM {t} WHERE group_name = $1 ORDER BY seq DESC OFFSET $2 LIMIT 1)"
            ),
        };
        Self {
            pool,
            config,
            retention: InboxRetention::default(),
            clock: Arc::new(SystemClock),
            sql: Arc::new(sql),
        }
    }

    /// Keeps ids to `retention`. Processes sharing a group should use the same retention:
    /// each record trims the group to the recording process's.
    pub fn with_retention(mut self, retention: InboxRetention) -> Self {
        self.retention = retention;
        self
    }

    /// Takes record times (and so ages) from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The clock's time as `timestamptz` keeps it (whole microseconds), so that a time read
    /// back compares as the time written.
    fn now(&self) -> DateTime<Utc> {
        self.clock.now().trunc_subsecs(6)
    }

    fn cutoff(&self) -> Option<DateTime<Utc>> {
        self.retention
            .cutoff(self.clock.now())
            .map(|c| c.trunc_subsecs(6))
    }
}

#[async_trait]
impl Inbox for PostgresInbox {
    fn describe(&self) -> String {
        format!(
            "postgres inbox in {}.inbox at {}",
            quote_ident(&self.config.schema),
            self.config.redacted_url()
        )
    }

    fn durable(&self) -> bool {
        true
    }

    fn retention(&self) -> InboxRetention {
        self.retention
    }

    async fn seen(&self, group: &str, id: &EventId) -> Result<bool> {
        validate_group(group)?;
        check_text("event id", id.as_str())?;
        let conn = client(&self.pool).await?;
        let statement = conn
            .prepare_cached(&self.sql.seen)
            .await
            .map_err(pg_error)?;
        let row = conn
            .query_opt(&statement, &[&group, &id.as_str()])
            .await
            .map_err(pg_error)?;
        Ok(match (row, self.cutoff()) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(row), Some(cutoff)) => row.get::<_, DateTime<Utc>>(0) >= cutoff,
        })
    }

    async fn record(&self, group: &str, id: &EventId) -> Result<()> {
        validate_group(group)?;
        check_text("event id", id.as_str())?;
        let now = self.now();
        let cutoff = self.cutoff();
        let mut conn = client(&self.pool).await?;
        let (forget_old, insert, forget_over) = futures::try_join!(
            conn.prepare_cached(&self.sql.forget_old),
            conn.prepare_cached(&self.sql.insert),
            conn.prepare_cached(&self.sql.forget_over),
        )
        .map_err(pg_error)?;
        let tx = conn.transaction().await.map_err(pg_error)?;
        if let Some(cutoff) = cutoff {
            tx.execute(&forget_old, &[&group, &cutoff])
                .await
                .map_err(pg_error)?;
        }
        tx.execute(&insert, &[&group, &id.as_str(), &now])
            .await
            .map_err(pg_error)?;
        if let Some(max) = self.retention.max_ids() {
            let keep = i64::try_from(max).unwrap_or(i64::MAX);
            tx.execute(&forget_over, &[&group, &keep])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }
}
