//! Subscriptions: catch up with range reads, then follow, woken by `LISTEN/NOTIFY` on one
//! connection per store and by a timer, always reading after the last position handed over.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use orchestrator_core::{Error, EventEnvelope, EventFilter, EventStream, Result, RetryPolicy};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use super::config::{Connector, quote_ident};
use super::conn::pg_error;
use super::store::{PAGE, PostgresEventStore};

/// The store's listening connection, started with its first subscription: a counter bumped
/// on every notification of the store's channel and on every (re)connection, which
/// subscriptions watch.
pub(crate) struct Notifier {
    pg: tokio_postgres::Config,
    connector: Connector,
    channel: String,
    wakeups: Mutex<Option<watch::Receiver<u64>>>,
}

impl Notifier {
    pub(crate) fn new(pg: tokio_postgres::Config, connector: Connector, channel: String) -> Self {
        Self {
            pg,
            connector,
            channel,
            wakeups: Mutex::new(None),
        }
    }

    /// A receiver of the wake-ups, starting the listener if it is not running; fails when the
    /// first connection cannot be made.
    pub(crate) async fn watch(&self) -> Result<watch::Receiver<u64>> {
        let mut wakeups = self.wakeups.lock().await;
        if let Some(rx) = wakeups.as_ref()
            && rx.has_changed().is_ok()
        {
            return Ok(rx.clone());
        }
        let (tx, rx) = watch::channel(0);
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(listen(
            self.pg.clone(),
            self.connector.clone(),
            self.channel.clone(),
            tx,
            Some(ready_tx),
        ));
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(Error::Closed {
                    what: "PostgreSQL listener".to_owned(),
                });
            }
        }
        *wakeups = Some(rx.clone());
        Ok(rx)
    }
}

/// What a connection's server sends besides replies: notifications, notices.
type Messages =
    Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send + 'static>>;

/// A connection, and the messages of the server, which drive it while they are read.
async fn connect(
    pg: &tokio_postgres::Config,
    connector: &Connector,
) -> Result<(tokio_postgres::Client, Messages)> {
    match connector {
        Connector::Plain => {
            let (client, mut connection) = pg.connect(NoTls).await.map_err(pg_error)?;
            let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            Ok((client, Box::pin(messages)))
        }
        #[cfg(feature = "postgres-tls")]
        Connector::Tls(tls) => {
            let (client, mut connection) = pg.connect(tls.clone()).await.map_err(pg_error)?;
            let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            Ok((client, Box::pin(messages)))
        }
    }
}

fn backoff() -> RetryPolicy {
    RetryPolicy::exponential(u32::MAX, Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
}

/// Keeps a connection listening on `channel`, reconnecting when it breaks, until every
/// receiver of `tx` is gone. Reports the first connection's outcome on `ready`.
async fn listen(
    pg: tokio_postgres::Config,
    connector: Connector,
    channel: String,
    tx: watch::Sender<u64>,
    mut ready: Option<oneshot::Sender<Result<()>>>,
) {
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let (client, mut messages) = connect(&pg, &connector).await?;
            let (done_tx, done_rx) = oneshot::channel::<()>();
            let bump = tx.clone();
            // Drives the connection, and with it the notifications, until it ends.
            tokio::spawn(async move {
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => {
                            bump.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "store subscription: listening connection failed");
                            break;
                        }
                    }
                }
                let _ = done_tx.send(());
            });
            client
                .batch_execute(&format!("LISTEN {}", quote_ident(&channel)))
                .await
                .map_err(pg_error)?;
            Ok::<_, Error>((client, done_rx))
        };
        let (client, done) = match attempt.await {
            Ok(listening) => listening,
            Err(error) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(error));
                    return;
                }
                failures = failures.saturating_add(1);
                let delay = backoff()
                    .delay_after(failures)
                    .unwrap_or(Duration::from_secs(2));
                tracing::warn!(%error, ?delay, "store subscription: cannot listen; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = tx.closed() => return,
                }
            }
        };
        let listening_since = std::time::Instant::now();
        // Whatever was notified while not listening is read now.
        tx.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        tokio::select! {
            _ = done => {}
            () = tx.closed() => return,
        }
        drop(client);
        // A connection that breaks again and again right after connecting (a server that
        // terminates it) is retried with a growing pause; one that lived is retried at once.
        failures = if listening_since.elapsed() < Duration::from_secs(5) {
            failures.saturating_add(1)
        } else {
            0
        };
        if failures > 0 {
            let delay = backoff()
                .delay_after(failures)
                .unwrap_or(Duration::from_secs(2));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = tx.closed() => return,
            }
        }
    }
}

/// Starts a subscription of `store` from `from_position` (inclusive).
pub(crate) async fn subscribe(
    store: PostgresEventStore,
    from_position: u64,
    filter: EventFilter,
) -> Result<EventStream> {
    // Fail now, not in the background, if PostgreSQL cannot be reached at all.
    let wakeups = store.inner.notifier.watch().await?;
    let (tx, rx) = mpsc::channel(PAGE);
    let follower = Follower {
        poll: store.inner.config.poll_interval,
        store,
        filter,
        next: from_position.max(1),
        tx,
        wakeups,
    };
    tokio::spawn(follower.run());
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })))
}

/// The task behind a subscription.
struct Follower {
    store: PostgresEventStore,
    filter: EventFilter,
    /// The next position to read from: one past the last row handed over or skipped.
    next: u64,
    tx: mpsc::Sender<Result<EventEnvelope>>,
    wakeups: watch::Receiver<u64>,
    poll: Duration,
}

impl Follower {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            // Marks the wake-ups seen before reading, so one that arrives during the read
            // triggers another.
            self.wakeups.mark_unchanged();
            let rows = match self.store.scan(self.next, &self.filter, PAGE).await {
                Ok(rows) => rows,
                Err(error) if error.is_temporary() => {
                    failures = failures.saturating_add(1);
                    let delay = backoff()
                        .delay_after(failures)
                        .unwrap_or(Duration::from_secs(2));
                    tracing::warn!(%error, ?delay, "store subscription: reading failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = self.tx.closed() => return,
                    }
                }
                Err(error) => {
                    let _ = self.tx.send(Err(error)).await;
                    return;
                }
            };
            failures = 0;
            let full = rows.len() == PAGE;
            for (position, event) in rows {
                self.next = position + 1;
                let item = match event {
                    Ok(event) if !self.filter.matches(&event) => continue,
                    // A row that does not decode is reported, and passed.
                    other => other,
                };
                if self.tx.send(item).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = self.wakeups.changed() => {
                    if changed.is_err() {
                        // The listener is gone (the store was dropped): poll only.
                        tokio::select! {
                            () = tokio::time::sleep(self.poll) => {}
                            () = self.tx.closed() => return,
                        }
                    }
                }
                () = tokio::time::sleep(self.poll) => {}
                () = self.tx.closed() => return,
            }
        }
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}
