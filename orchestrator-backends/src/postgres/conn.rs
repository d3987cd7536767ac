//! Error mapping, pooled connections and the numbers PostgreSQL stores as `bigint`.

use deadpool_postgres::{Object, Pool, PoolError};
use orchestrator_core::{Error, Result};
use tokio_postgres::error::SqlState;

/// The backend name in errors.
pub(crate) const BACKEND: &str = "postgres";

/// Whether retrying after `error` can help: the connection broke, the server is starting or
/// shutting down, or the transaction lost a serialization or deadlock race.
pub(crate) fn is_temporary(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    #[cfg(feature = "postgres-tls")]
    if refused_certificate(error) {
        return false;
    }
    match error.code() {
        // No SQLSTATE: an I/O error, a timeout, a connection that went away.
        None => true,
        Some(code) => {
            code.code().starts_with("08") // connection exception
                || code.code().starts_with("53") // insufficient resources
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::QUERY_CANCELED
        }
    }
}

/// Whether TLS refused the server's certificate (or the server's TLS as a whole): trying
/// again meets the same certificate, so no retry can help.
#[cfg(feature = "postgres-tls")]
fn refused_certificate(error: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    let mut cause = error.source();
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::PeerIncompatible(_)
            );
        }
        cause = match e.downcast_ref::<std::io::Error>() {
            // tokio-rustls reports rustls errors inside an `io::Error`, whose `source()`
            // skips the error it wraps.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// A tokio-postgres error as the core error.
pub(crate) fn pg_error(error: tokio_postgres::Error) -> Error {
    match statement_timeout(&error) {
        Some(timeout) => Error::backend(BACKEND, true, timeout),
        None => Error::backend(BACKEND, is_temporary(&error), error),
    }
}

/// What the server said when it cancelled a statement that ran past `statement_timeout`, if
/// `error` is that.
pub(crate) fn statement_timeout(error: &tokio_postgres::Error) -> Option<PostgresStatementTimeout> {
    let db = error.as_db_error()?;
    // The same SQLSTATE is used for a cancel request (`pg_cancel_backend`); only the
    // message tells the two apart.
    (*db.code() == SqlState::QUERY_CANCELED && db.message().contains("statement timeout")).then(
        || PostgresStatementTimeout {
            message: db.message().to_owned(),
        },
    )
}

/// The source of the [`Error::Backend`] (with `temporary: true`) returned when PostgreSQL
/// cancels a statement that ran past the session's `statement_timeout`
/// ([`PostgresConfig::with_statement_timeout`](super::PostgresConfig::with_statement_timeout)).
///
/// The statement was rolled back: nothing of it was written (an append cancelled so stored
/// none of its events). It counts as temporary, so retry policies retry it: a statement
/// slowed by load or by waiting for a lock may well finish the next time, and a statement
/// that is slow by nature fails again until the policy gives up. Find it with
/// [`PostgresStatementTimeout::find`].
///
/// ```
/// use orchestrator_backends::postgres::PostgresStatementTimeout;
/// use orchestrator_core::Error;
///
/// let other = Error::backend("postgres", true, "connection reset");
/// assert!(PostgresStatementTimeout::find(&other).is_none());
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStatementTimeout {
    message: String,
}

impl PostgresStatementTimeout {
    /// The statement timeout `error` stands for, if it is one.
    pub fn find(error: &Error) -> Option<&Self> {
        match error {
            Error::Backend { source, .. } => source.downcast_ref::<Self>(),
            _ => None,
        }
    }

    /// The server's message ("canceling statement due to statement timeout").
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for PostgresStatementTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the statement ran past statement_timeout and was cancelled, writing nothing ({})",
            self.message
        )
    }
}

impl std::error::Error for PostgresStatementTimeout {}

/// A pool error (no connection could be made or none became free in time) as the core error.
pub(crate) fn pool_error(error: PoolError) -> Error {
    match error {
        PoolError::Backend(e) => pg_error(e),
        // Timeouts and a closed pool: waiting or reconnecting may help, except when closed.
        PoolError::Closed => Error::Closed {
            what: "PostgreSQL connection pool".to_owned(),
        },
        other => Error::backend(BACKEND, true, other),
    }
}

/// A pooled connection.
pub(crate) async fn client(pool: &Pool) -> Result<Object> {
    pool.get().await.map_err(pool_error)
}

/// Refuses text PostgreSQL cannot store: `text` holds any UTF-8 but the NUL character.
pub(crate) fn check_text(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::invalid(
            what,
            format!("{text:?} contains a NUL character, which PostgreSQL text cannot hold"),
        ));
    }
    Ok(())
}

/// A `bigint` the backend wrote, which is never negative.
pub(crate) fn to_u64(what: &str, n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| {
        Error::backend(
            BACKEND,
            false,
            format!("a stored {what} is negative ({n}): the table was written by hand?"),
        )
    })
}

/// A clamp of a caller's `u64` (a version or position to read from) to `bigint`: anything
/// past `i64::MAX` reads nothing either way.
pub(crate) fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
