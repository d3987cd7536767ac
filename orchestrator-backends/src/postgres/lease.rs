//! [`PostgresLease`]: a lease kept in one row of `<schema>.leases`, for the processes that
//! share a PostgreSQL store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use orchestrator_core::{Error, Lease, Result};

use super::config::{PostgresConfig, quote_ident};
use super::conn::{check_text, client, pg_error};
use super::schema::migrate;

/// A [`Lease`] kept in the row `name` of `<schema>.leases`: the holder's token and when the
/// hold expires, by the database server's clock (so the candidates' clocks do not matter).
///
/// Taking or renewing it is one `INSERT … ON CONFLICT DO UPDATE … WHERE` that succeeds when
/// the row is missing, expired, or already ours; a holder that dies stops renewing it, and
/// another candidate takes it after [`Lease::ttl`]. A row, rather than a session-level
/// advisory lock, because a pooled connection outlives the holder's interest in it and a
/// lost connection would silently drop an advisory lock while the holder still works.
///
/// Each value has its own token (a fresh UUID with the process id), so two values compete
/// even inside one process. From
/// [`PostgresEventStore::lease`](orchestrator_core::EventStore::lease) with a 5 s time to
/// live, or [`PostgresLease::connect`].
#[derive(Clone)]
pub struct PostgresLease {
    pool: Pool,
    name: String,
    token: String,
    ttl: Duration,
    sql: Arc<(String, String)>,
    table: String,
}

impl std::fmt::Debug for PostgresLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLease")
            .field("table", &self.table)
            .field("name", &self.name)
            .field("token", &self.token)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl PostgresLease {
    /// Connects to PostgreSQL, creates or migrates the config's schema, and returns a
    /// candidate for the lease `name` that lasts `ttl` without renewal (at least 1 ms).
    pub async fn connect(config: PostgresConfig, name: &str, ttl: Duration) -> Result<Self> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "lease name",
                format!("{name:?} must be non-empty, without control characters"),
            ));
        }
        let pool = config.pool()?;
        migrate(&mut client(&pool).await?, &config.schema).await?;
        Ok(Self::on_pool(pool, &config.schema, name, ttl))
    }

    /// A candidate on an existing pool whose schema is migrated.
    pub(crate) fn on_pool(pool: Pool, schema: &str, name: &str, ttl: Duration) -> Self {
        let table = format!("{}.leases", quote_ident(schema));
        let acquire = format!(
            "INSERT INTO {table} AS l (name, holder, expires_at) \
             VALUES ($1, $2, now() + $3::float8 * interval '1 millisecond') \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                 expires_at = excluded.expires_at \
             WHERE l.holder = excluded.holder OR l.expires_at < now() \
             RETURNING holder"
        );
        let release = format!("DELETE FROM {table} WHERE name = $1 AND holder = $2");
        Self {
            pool,
            name: name.to_owned(),
            token: format!("{}/{}", std::process::id(), uuid::Uuid::now_v7()),
            ttl: ttl.max(Duration::from_millis(1)),
            sql: Arc::new((acquire, release)),
            table,
        }
    }

    /// This candidate's token, as the row holds it while this candidate holds the lease.
    pub fn token(&self) -> &str {
        &self.token
    }
}

#[async_trait]
impl Lease for PostgresLease {
    fn describe(&self) -> String {
        format!("postgres row `{}` of {}", self.name, self.table)
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn try_acquire(&self) -> Result<bool> {
        check_text("lease name", &self.name)?;
        let conn = client(&self.pool).await?;
        let statement = conn.prepare_cached(&self.sql.0).await.map_err(pg_error)?;
        // Milliseconds as a float8: exact for any time to live up to 2^53 ms.
        #[allow(clippy::cast_precision_loss)]
        let millis = self.ttl.as_millis() as f64;
        let row = conn
            .query_opt(&statement, &[&self.name, &self.token, &millis])
            .await
            .map_err(pg_error)?;
        Ok(row.is_some())
    }

    async fn release(&self) -> Result<()> {
        let conn = client(&self.pool).await?;
        let statement = conn.prepare_cached(&self.sql.1).await.map_err(pg_error)?;
        conn.execute(&statement, &[&self.name, &self.token])
            .await
            .map_err(pg_error)?;
        Ok(())
    }
}
