//! [`PostgresReadModelStore`]: a read model's documents and position in two tables, written
//! in one transaction per event.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use orchestrator_core::read_model::{ReadModelStore, ReadModelTransaction};
use orchestrator_core::{Error, Result};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::config::{PostgresConfig, quote_ident};
use super::conn::{check_text, clamp_i64, client, pg_error, to_u64};
use super::schema::migrate;

/// A [`ReadModelStore`] in PostgreSQL whose transactions make projections exactly-once: an
/// event's document writes and the read model's position commit together.
///
/// Documents are rows of `<schema>.read_model_documents` (`read_model`, `key`, `document`
/// as `jsonb`, `updated_at`), the position a row of `<schema>.read_model_positions`
/// (`read_model`, `position`, `updated_at`), both keyed by the read model's name, so any
/// number of read models share the tables (and can be queried with SQL).
///
/// [`begin`](ReadModelStore::begin) opens a transaction on a pooled connection and locks the
/// read model's position row (`INSERT … ON CONFLICT DO UPDATE … RETURNING position`): a
/// second runner of the same read model waits there, then reads the position the first one
/// committed and steps aside. Reads in the transaction see its own writes; the position set
/// through it is written with `COMMIT`, in one round trip. A transaction dropped unfinished
/// (its task cancelled or crashed) closes its connection instead of returning it to the
/// pool, which makes the server roll it back.
///
/// Outside transactions every call is one statement (`clear` is one transaction). `list`
/// sorts keys by their bytes (`COLLATE "C"`), as Rust sorts strings. Documents are `jsonb`:
/// objects come back with their keys sorted and deduplicated, and strings cannot hold
/// `\u0000` (PostgreSQL refuses them: a permanent error).
///
/// ```no_run
/// use std::sync::Arc;
/// use orchestrator_backends::postgres::{PostgresConfig, PostgresReadModelStore};
/// use orchestrator_core::read_model::ReadModelStore;
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let config = PostgresConfig::new("postgres://postgres@127.0.0.1:5432/test")?;
/// let orders: Arc<dyn ReadModelStore> =
///     Arc::new(PostgresReadModelStore::connect(config, "order-totals").await?);
/// // Then: ReadModelDefinition::new("order-totals", project).storage(orders)
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresReadModelStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: PostgresConfig,
    name: String,
    sql: Sql,
}

/// The statements, with the schema filled in.
struct Sql {
    get: String,
    put: String,
    remove: String,
    list: String,
    clear_documents: String,
    clear_position: String,
    position: String,
    set_position: String,
    /// Locks the position row (creating it at 0) and returns the position.
    lock_position: String,
    /// Writes the position of a transaction, whose row is locked.
    write_position: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = quote_ident(schema);
        let docs = format!("{s}.read_model_documents");
        let positions = format!("{s}.read_model_positions");
        Self {
            get: format!("SELECT document FROM {docs} WHERE read_model = $1 AND key = $2"),
            put: format!(
                "INSERT INTO {docs} (read_model, key, document) VALUES ($1, $2, $3) \
                 ON CONFLICT (read_model, key) \
                 DO UPDATE SET document = EXCLUDED.document, updated_at = now()"
            ),
            remove: format!(
                "DELETE FROM {docs} WHERE read_model = $1 AND key = $2 RETURNING document"
            ),
            list: format!(
                "SELECT key, document FROM {docs} WHERE read_model = $1 ORDER BY key COLLATE \"C\""
            ),
            clear_documents: format!("DELETE FROM {docs} WHERE read_model = $1"),
            clear_position: format!(
                "UPDATE {positions} SET position = 0, updated_at = now() WHERE read_model = $1"
            ),
            position: format!("SELECT position FROM {positions} WHERE read_model = $1"),
            set_position: format!(
                "INSERT INTO {positions} AS p (read_model, position) VALUES ($1, $2) \
                 ON CONFLICT (read_model) DO UPDATE \
                 SET position = greatest(p.position, EXCLUDED.position), updated_at = now()"
            ),
            lock_position: format!(
                "INSERT INTO {positions} AS p (read_model, position) VALUES ($1, 0) \
                 ON CONFLICT (read_model) DO UPDATE SET position = p.position \
                 RETURNING position"
            ),
            write_position: format!(
                "UPDATE {positions} SET position = $2, updated_at = now() WHERE read_model = $1"
            ),
        }
    }
}

impl std::fmt::Debug for PostgresReadModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresReadModelStore")
            .field("url", &self.inner.config.redacted_url())
            .field("schema", &self.inner.config.schema)
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl PostgresReadModelStore {
    /// Connects to PostgreSQL, creates or migrates the config's schema (as
    /// [`PostgresEventStore::connect`](super::PostgresEventStore::connect) does) and keeps
    /// the documents of the read model `name` (any text without NUL characters, not empty).
    pub async fn connect(config: PostgresConfig, name: impl Into<String>) -> Result<Self> {
        let name = validate_name(name.into())?;
        let pool = config.pool()?;
        migrate(&mut client(&pool).await?, &config.schema).await?;
        Ok(Self::on_pool(pool, config, name))
    }

    /// A store on an existing pool whose schema is migrated; `name` is validated.
    pub(crate) fn on_pool(pool: Pool, config: PostgresConfig, name: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                sql: Sql::new(&config.schema),
                pool,
                config,
                name,
            }),
        }
    }

    /// The read model's name, which keys its rows.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

/// Checks a read model's name.
pub(crate) fn validate_name(name: String) -> Result<String> {
    if name.is_empty() {
        return Err(Error::invalid("read model name", "must not be empty"));
    }
    check_text("read model name", &name)?;
    Ok(name)
}

// The statements, on any connection (pooled, or a transaction's).

async fn get(conn: &Object, inner: &Inner, key: &str) -> Result<Option<Value>> {
    check_text("document key", key)?;
    let statement = conn
        .prepare_cached(&inner.sql.get)
        .await
        .map_err(pg_error)?;
    let row = conn
        .query_opt(&statement, &[&inner.name, &key])
        .await
        .map_err(pg_error)?;
    Ok(row.map(|row| row.get(0)))
}

async fn put(conn: &Object, inner: &Inner, key: &str, value: &Value) -> Result<()> {
    check_text("document key", key)?;
    let statement = conn
        .prepare_cached(&inner.sql.put)
        .await
        .map_err(pg_error)?;
    conn.execute(&statement, &[&inner.name, &key, value])
        .await
        .map_err(pg_error)?;
    Ok(())
}

async fn remove(conn: &Object, inner: &Inner, key: &str) -> Result<Option<Value>> {
    check_text("document key", key)?;
    let statement = conn
        .prepare_cached(&inner.sql.remove)
        .await
        .map_err(pg_error)?;
    let row = conn
        .query_opt(&statement, &[&inner.name, &key])
        .await
        .map_err(pg_error)?;
    Ok(row.map(|row| row.get(0)))
}

async fn list(conn: &Object, inner: &Inner) -> Result<Vec<(String, Value)>> {
    let statement = conn
        .prepare_cached(&inner.sql.list)
        .await
        .map_err(pg_error)?;
    let rows = conn
        .query(&statement, &[&inner.name])
        .await
        .map_err(pg_error)?;
    Ok(rows
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

async fn clear_documents(conn: &Object, inner: &Inner) -> Result<()> {
    conn.execute(&inner.sql.clear_documents, &[&inner.name])
        .await
        .map_err(pg_error)?;
    Ok(())
}

#[async_trait]
impl ReadModelStore for PostgresReadModelStore {
    async fn get(&self, key: &str) -> Result<Option<Value>> {
        get(&client(&self.inner.pool).await?, &self.inner, key).await
    }

    async fn put(&self, key: &str, value: Value) -> Result<()> {
        put(&client(&self.inner.pool).await?, &self.inner, key, &value).await
    }

    async fn remove(&self, key: &str) -> Result<Option<Value>> {
        remove(&client(&self.inner.pool).await?, &self.inner, key).await
    }

    async fn list(&self) -> Result<Vec<(String, Value)>> {
        list(&client(&self.inner.pool).await?, &self.inner).await
    }

    async fn clear(&self) -> Result<()> {
        let mut conn = client(&self.inner.pool).await?;
        let tx = conn.transaction().await.map_err(pg_error)?;
        tx.execute(&self.inner.sql.clear_documents, &[&self.inner.name])
            .await
            .map_err(pg_error)?;
        tx.execute(&self.inner.sql.clear_position, &[&self.inner.name])
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn position(&self) -> Result<Option<u64>> {
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.position)
            .await
            .map_err(pg_error)?;
        let row = conn
            .query_opt(&statement, &[&self.inner.name])
            .await
            .map_err(pg_error)?;
        // The store records every position it is given: no row yet means nothing applied.
        match row {
            None => Ok(Some(0)),
            Some(row) => to_u64("read model position", row.get(0)).map(Some),
        }
    }

    async fn set_position(&self, position: u64) -> Result<()> {
        let conn = client(&self.inner.pool).await?;
        let statement = conn
            .prepare_cached(&self.inner.sql.set_position)
            .await
            .map_err(pg_error)?;
        conn.execute(&statement, &[&self.inner.name, &clamp_i64(position)])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn begin(&self) -> Result<Option<Arc<dyn ReadModelTransaction>>> {
        let conn = client(&self.inner.pool).await?;
        let lock = conn
            .prepare_cached(&self.inner.sql.lock_position)
            .await
            .map_err(pg_error)?;
        // Pipelined: one round trip.
        let params: [&(dyn ToSql + Sync); 1] = [&self.inner.name];
        let began =
            futures::try_join!(conn.batch_execute("BEGIN"), conn.query_one(&lock, &params),);
        let position = match began {
            Ok(((), row)) => to_u64("read model position", row.get(0))?,
            Err(e) => {
                close(conn);
                return Err(pg_error(e));
            }
        };
        Ok(Some(Arc::new(PostgresReadModelTransaction {
            store: self.clone(),
            conn: tokio::sync::Mutex::new(Some(conn)),
            position: Mutex::new(position),
        })))
    }
}

/// Closes a connection rather than return it to the pool: the server rolls back its open
/// transaction, if any, without a round trip.
fn close(conn: Object) {
    drop(Object::take(conn));
}

/// A transaction of a [`PostgresReadModelStore`], on a connection of its own until it ends.
struct PostgresReadModelTransaction {
    store: PostgresReadModelStore,
    /// `None` once committed or rolled back.
    conn: tokio::sync::Mutex<Option<Object>>,
    /// The position as of `begin`, moved by `set_position` and `clear`; written at commit.
    position: Mutex<u64>,
}

impl PostgresReadModelTransaction {
    /// The connection, locked for one call; an error once the transaction ended.
    async fn conn(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Object>> {
        tokio::sync::MutexGuard::try_map(self.conn.lock().await, Option::as_mut)
            .map_err(|_| finished())
    }

    fn position(&self) -> std::sync::MutexGuard<'_, u64> {
        // One integer: a panic cannot leave it half-written.
        self.position.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the connection, ending the transaction.
    async fn finish(&self) -> Result<Object> {
        self.conn.lock().await.take().ok_or_else(finished)
    }
}

/// The error for a transaction used after its commit or rollback.
fn finished() -> Error {
    Error::invalid(
        "read model transaction",
        "used after its commit or rollback",
    )
}

impl Drop for PostgresReadModelTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().take() {
            close(conn);
        }
    }
}

#[async_trait]
impl ReadModelStore for PostgresReadModelTransaction {
    async fn get(&self, key: &str) -> Result<Option<Value>> {
        get(&*self.conn().await?, &self.store.inner, key).await
    }

    async fn put(&self, key: &str, value: Value) -> Result<()> {
        put(&*self.conn().await?, &self.store.inner, key, &value).await
    }

    async fn remove(&self, key: &str) -> Result<Option<Value>> {
        remove(&*self.conn().await?, &self.store.inner, key).await
    }

    async fn list(&self) -> Result<Vec<(String, Value)>> {
        list(&*self.conn().await?, &self.store.inner).await
    }

    async fn clear(&self) -> Result<()> {
        clear_documents(&*self.conn().await?, &self.store.inner).await?;
        *self.position() = 0;
        Ok(())
    }

    async fn position(&self) -> Result<Option<u64>> {
        // Checked first: an ended transaction has no position to tell.
        drop(self.conn().await?);
        Ok(Some(*self.position()))
    }

    async fn set_position(&self, position: u64) -> Result<()> {
        drop(self.conn().await?);
        let mut mine = self.position();
        *mine = (*mine).max(position);
        Ok(())
    }
}

#[async_trait]
impl ReadModelTransaction for PostgresReadModelTransaction {
    async fn commit(&self) -> Result<()> {
        let conn = self.finish().await?;
        let position = clamp_i64(*self.position());
        let inner = &self.store.inner;
        let written = async {
            let write = conn.prepare_cached(&inner.sql.write_position).await?;
            let params: [&(dyn ToSql + Sync); 2] = [&inner.name, &position];
            // Pipelined: one round trip. Should the write fail, the server turns the
            // `COMMIT` into a rollback and the write's error is returned.
            futures::try_join!(conn.execute(&write, &params), conn.batch_execute("COMMIT"),)
        }
        .await;
        match written {
            Ok(_) => Ok(()),
            Err(e) => {
                close(conn);
                Err(pg_error(e))
            }
        }
    }

    async fn rollback(&self) -> Result<()> {
        let conn = self.finish().await?;
        if let Err(e) = conn.batch_execute("ROLLBACK").await {
            close(conn);
            return Err(pg_error(e));
        }
        Ok(())
    }
}
