//! Group commit: the appends waiting in one process share one transaction.
//!
//! Appends to a schema are serialised by its append lock from the statement to the end of
//! the commit, so each transaction costs a WAL flush that no other append can share. One
//! writer task per store therefore runs the transactions: while one is in flight, the
//! appends that arrive queue, and the next transaction carries all of them (up to
//! [`MAX_APPENDS`] appends or [`MAX_EVENTS`] events) through `append_batch` (migration 3),
//! which checks and writes each in turn and answers for each alone.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use orchestrator_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::conn::{BACKEND, PostgresStatementTimeout, client, is_temporary, statement_timeout};

/// At most this many appends share a transaction.
const MAX_APPENDS: usize = 512;
/// A transaction takes no more appends once it holds this many events (a larger append still
/// goes, alone).
const MAX_EVENTS: usize = 10_000;
/// At most this many yields to let woken callers queue before a transaction closes.
const MAX_YIELDS: usize = 8;

/// One event of an append, encoded before it is queued.
pub(crate) struct Prepared {
    pub(crate) id: String,
    pub(crate) event_type: String,
    pub(crate) time: DateTime<Utc>,
    /// The CloudEvents JSON without its closing `}`: the positions are added under the lock.
    pub(crate) open_json: String,
}

/// An append as the writer task runs it.
pub(crate) struct Request {
    pub(crate) stream: String,
    /// The expectation: 0 any, 1 no stream, 2 an existing stream, 3 exactly `exact`.
    pub(crate) kind: i32,
    pub(crate) exact: i64,
    pub(crate) events: Vec<Prepared>,
}

/// What `append_batch` answered for one append.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// 0 written, 1 some ids are in the stream (nothing written), 2 the expectation fails.
    pub(crate) status: i32,
    pub(crate) version: Option<i64>,
    pub(crate) first_position: Option<i64>,
    pub(crate) last_position: Option<i64>,
}

struct Queued {
    request: Request,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// What the writer task needs; it holds no reference to the store, so the task ends when the
/// store (its queue's sender) is dropped.
struct Shared {
    pool: Pool,
    statement: String,
    lock_key: i32,
    channel: String,
}

/// The queue of a store's appends and the writer task that empties it.
pub(crate) struct Committer {
    shared: Arc<Shared>,
    queue: Mutex<Option<mpsc::UnboundedSender<Queued>>>,
}

impl Committer {
    /// A committer running `append_batch` of `schema` (quoted) on `pool`; its task starts with
    /// the first append.
    pub(crate) fn new(pool: Pool, quoted_schema: &str, lock_key: i32, channel: String) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                statement: format!(
                    "SELECT idx, status, version, first_position, last_position \
                     FROM {quoted_schema}.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ),
                lock_key,
                channel,
            }),
            queue: Mutex::new(None),
        }
    }

    /// Queues `request` and waits for its outcome. Once queued, the append is carried out
    /// even if the caller stops waiting.
    pub(crate) async fn append(&self, request: Request) -> Result<Outcome> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Queued { request, reply })?;
        answer.await.map_err(|_| {
            Error::backend(
                BACKEND,
                true,
                "the append writer stopped (its runtime shut down) before answering; the \
                 append may or may not have been written: try again (appends are idempotent)",
            )
        })?
    }

    fn enqueue(&self, queued: Queued) -> Result<()> {
        // A poisoned lock only means a thread panicked while swapping the sender: the
        // `Option` inside is still whole.
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let queued = match queue.as_ref() {
            Some(sender) => match sender.send(queued) {
                Ok(()) => return Ok(()),
                // The task is gone (the runtime it ran on shut down): start another.
                Err(mpsc::error::SendError(queued)) => queued,
            },
            None => queued,
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::backend(
                BACKEND,
                false,
                "PostgresEventStore::append must run inside a tokio runtime",
            )
        })?;
        let (sender, receiver) = mpsc::unbounded_channel();
        runtime.spawn(run(self.shared.clone(), receiver));
        // Just made, with its receiver alive in the task.
        sender
            .send(queued)
            .map_err(|_| Error::backend(BACKEND, true, "the append writer could not be started"))?;
        *queue = Some(sender);
        Ok(())
    }
}

/// The writer task: one transaction at a time, each with every append queued meanwhile.
/// The queue holds at most one append per waiting caller.
async fn run(shared: Arc<Shared>, mut receiver: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = receiver.recv().await {
        let mut events = first.request.events.len();
        let mut batch = vec![first];
        // The callers answered by the last transaction are being woken now, and most append
        // again at once: let them run before the batch is closed, or the next transaction
        // would carry the first of them only and the rest wait a whole commit more. Yielding
        // costs microseconds; it stops as soon as a yield brings nothing new.
        for _ in 0..MAX_YIELDS {
            let before = batch.len();
            while batch.len() < MAX_APPENDS && events < MAX_EVENTS {
                match receiver.try_recv() {
                    Ok(next) => {
                        events += next.request.events.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            if batch.len() == before || batch.len() >= MAX_APPENDS || events >= MAX_EVENTS {
                break;
            }
            tokio::task::yield_now().await;
        }
        tracing::trace!(appends = batch.len(), events, "group commit");
        commit(&shared, batch).await;
    }
}

/// Runs `batch` in one transaction and answers each caller. When the transaction fails as a
/// whole with an error a single append can cause (not a broken connection), nothing was
/// written: each append is run again alone, so that one bad append fails alone.
async fn commit(shared: &Shared, batch: Vec<Queued>) {
    let requests: Vec<&Request> = batch.iter().map(|q| &q.request).collect();
    match transaction(shared, &requests).await {
        Ok(outcomes) => {
            for (queued, outcome) in batch.into_iter().zip(outcomes) {
                // A caller that stopped waiting has nobody to tell.
                let _ = queued.reply.send(Ok(outcome));
            }
        }
        Err(Failure::Sql(_)) if batch.len() > 1 => {
            for queued in batch {
                let outcome = match transaction(shared, &[&queued.request]).await {
                    Ok(mut outcomes) => outcomes.pop().ok_or_else(missing_row),
                    Err(failure) => Err(failure.to_error(&queued.request.stream)),
                };
                let _ = queued.reply.send(outcome);
            }
        }
        Err(failure) => {
            for queued in batch {
                let _ = queued
                    .reply
                    .send(Err(failure.to_error(&queued.request.stream)));
            }
        }
    }
}

/// Why a transaction failed.
enum Failure {
    /// A statement failed on the server for a reason of its own (the transaction rolled back).
    Sql(tokio_postgres::Error),
    /// The connection or the pool failed: whether the transaction committed is unknown
    /// when it broke during the commit.
    Connection { temporary: bool, message: String },
    /// The server cancelled the statement: it ran past `statement_timeout` (nothing written).
    Timeout(PostgresStatementTimeout),
}

impl Failure {
    fn from_pg(error: tokio_postgres::Error) -> Self {
        if let Some(timeout) = statement_timeout(&error) {
            return Self::Timeout(timeout);
        }
        if error.code().is_some() && !is_temporary(&error) {
            Self::Sql(error)
        } else {
            Self::Connection {
                temporary: is_temporary(&error),
                message: describe(&error),
            }
        }
    }

    fn to_error(&self, stream: &str) -> Error {
        match self {
            Self::Sql(error) => sql_error(stream, error),
            Self::Connection { temporary, message } => {
                Error::backend(BACKEND, *temporary, message.clone())
            }
            Self::Timeout(timeout) => Error::backend(BACKEND, true, timeout.clone()),
        }
    }
}

fn sql_error(stream: &str, error: &tokio_postgres::Error) -> Error {
    // Under the lock no other append can take these versions; a writer that bypasses it (SQL
    // by hand) can, and the unique constraints stop it there.
    if error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        Error::backend(
            BACKEND,
            true,
            format!(
                "stream `{stream}`: a row written without the append lock took a version or \
                 id of this append ({error}); nothing was written"
            ),
        )
    } else {
        Error::backend(BACKEND, is_temporary(error), describe(error))
    }
}

/// The error with the server's message (`Display` of a tokio-postgres error says only
/// "db error"): an error of one append goes to its caller, who cannot own the original.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{error}: {db}"),
        None => error.to_string(),
    }
}

fn missing_row() -> Error {
    Error::backend(
        BACKEND,
        false,
        "append_batch answered fewer rows than it was given appends",
    )
}

/// One transaction running `requests` through `append_batch`: `BEGIN`, the statement and
/// `COMMIT` pipelined in one round trip, so the lock is held for the statement and the commit
/// only.
async fn transaction(shared: &Shared, requests: &[&Request]) -> Result<Vec<Outcome>, Failure> {
    let conn = client(&shared.pool)
        .await
        .map_err(|error| Failure::Connection {
            temporary: error.is_temporary(),
            message: error.to_string(),
        })?;
    let statement = conn
        .prepare_cached(&shared.statement)
        .await
        .map_err(Failure::from_pg)?;
    let total: usize = requests.iter().map(|r| r.events.len()).sum();
    let streams: Vec<&str> = requests.iter().map(|r| r.stream.as_str()).collect();
    let kinds: Vec<i32> = requests.iter().map(|r| r.kind).collect();
    let exact: Vec<i64> = requests.iter().map(|r| r.exact).collect();
    let mut counts = Vec::with_capacity(requests.len());
    let mut ids = Vec::with_capacity(total);
    let mut types = Vec::with_capacity(total);
    let mut times = Vec::with_capacity(total);
    let mut jsons = Vec::with_capacity(total);
    for request in requests {
        // An append holds far fewer than 2^31 events (each is a row of its own).
        counts.push(i32::try_from(request.events.len()).unwrap_or(i32::MAX));
        for event in &request.events {
            ids.push(event.id.as_str());
            types.push(event.event_type.as_str());
            times.push(event.time);
            jsons.push(event.open_json.as_str());
        }
    }
    let lock_class = super::schema::APPEND_LOCK_CLASS;
    let params: [&(dyn ToSql + Sync); 11] = [
        &streams,
        &kinds,
        &exact,
        &counts,
        &ids,
        &types,
        &times,
        &jsons,
        &lock_class,
        &shared.lock_key,
        &shared.channel,
    ];
    let (_, rows, _) = futures::try_join!(
        conn.batch_execute("BEGIN"),
        conn.query(&statement, &params),
        conn.batch_execute("COMMIT"),
    )
    .map_err(Failure::from_pg)?;
    let mut outcomes = vec![None; requests.len()];
    for row in &rows {
        let idx: i32 = row.get(0);
        let slot = usize::try_from(idx)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| outcomes.get_mut(i));
        if let Some(slot) = slot {
            *slot = Some(Outcome {
                status: row.get(1),
                version: row.get(2),
                first_position: row.get(3),
                last_position: row.get(4),
            });
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.ok_or_else(|| Failure::Connection {
                temporary: false,
                message: missing_row().to_string(),
            })
        })
        .collect()
}
