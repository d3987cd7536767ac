//! Idempotency by command id: a command sent again with the same id gets the first
//! outcome back without running again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;

use super::middleware::{CommandMiddleware, Next};
use super::{CommandOutcome, CommandRequest};
use crate::canonical::fingerprint;
use crate::error::{Error, Result};
use crate::telemetry;

/// Remembers the outcome of each command sent with an id ([`CommandRequest::with_id`]) and
/// returns it, marked [`replayed`](CommandOutcome::replayed), when the same command name and
/// id come again — without running the handler.
///
/// - **Concurrent duplicates wait.** While the first is running, a duplicate waits for it
///   and then gets its outcome.
/// - **Only successes are remembered.** If the first fails, the next duplicate runs the
///   command itself (one at a time), so a failed command can be retried with its id.
/// - **The id names one payload.** The same id with a different payload (compared in
///   canonical JSON) is [`Error::IdempotencyKeyReused`].
/// - **Bounded memory.** Outcomes are kept in a `moka` cache of a fixed capacity for a
///   time-to-live; past either, an id may run again. Commands without an id pass through.
///
/// Remembered outcomes live in memory: a restart forgets them.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use orchestrator_core::HandlerError;
/// use orchestrator_cqrs::{CommandBus, CommandRequest, IdempotencyMiddleware};
/// use serde_json::{Value, json};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> orchestrator_cqrs::Result<()> {
/// let bus = CommandBus::builder().middleware(IdempotencyMiddleware::default()).build();
/// let runs = Arc::new(AtomicU32::new(0));
/// let counter = runs.clone();
/// bus.register("pay", move |_: Value| {
///     let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
///     async move { Ok::<_, HandlerError>(json!({ "payment": n })) }
/// })?;
///
/// let pay = || CommandRequest::new("pay", json!({ "amount": 10 })).with_id("pay-42");
/// let first = bus.dispatch(pay()).await?;
/// let again = bus.dispatch(pay()).await?;
/// assert_eq!((first.value, again.value, again.replayed), (json!({"payment": 1}), json!({"payment": 1}), true));
/// assert_eq!(runs.load(Ordering::SeqCst), 1);
/// # Ok(())
/// # }
/// ```
pub struct IdempotencyMiddleware {
    completed: moka::future::Cache<Arc<str>, Arc<Remembered>>,
    in_flight: InFlight,
}

/// One lock per command key being run.
type InFlight = Arc<Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>>;

struct Remembered {
    fingerprint: u64,
    outcome: CommandOutcome,
}

impl std::fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("remembered", &self.completed.entry_count())
            .finish_non_exhaustive()
    }
}

impl Default for IdempotencyMiddleware {
    /// 100,000 outcomes for 24 hours.
    fn default() -> Self {
        Self::new(100_000, Duration::from_secs(24 * 3600))
    }
}

impl IdempotencyMiddleware {
    /// Remembers at most `capacity` outcomes, each for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            completed: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            in_flight: Arc::default(),
        }
    }

    async fn remembered(
        &self,
        key: &Arc<str>,
        request: &CommandRequest,
        fingerprint: u64,
    ) -> Result<Option<CommandOutcome>> {
        let Some(hit) = self.completed.get(key).await else {
            return Ok(None);
        };
        if hit.fingerprint != fingerprint {
            return Err(Error::IdempotencyKeyReused {
                command: request.name.to_string(),
                id: request.id.as_deref().unwrap_or_default().to_owned(),
            });
        }
        metrics::counter!(telemetry::IDEMPOTENT_REPLAYS, "command" => request.name.clone())
            .increment(1);
        Ok(Some(hit.outcome.clone().replayed()))
    }

    /// Waits for this key's turn: one command per key runs at a time.
    async fn turn(&self, key: &Arc<str>) -> Turn {
        let lock = {
            let mut map = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        Turn {
            map: self.in_flight.clone(),
            key: key.clone(),
            lock,
            guard: Some(guard),
        }
    }
}

/// A key's turn; dropping it lets the next duplicate in, and forgets the key's lock when
/// nobody else waits for it.
struct Turn {
    map: InFlight,
    key: Arc<str>,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Every clone of the lock is taken under the map's mutex, so under it the count is
        // exact: the map's and ours alone mean nobody is waiting.
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

#[async_trait]
impl CommandMiddleware for IdempotencyMiddleware {
    async fn handle(&self, request: CommandRequest, next: Next<'_>) -> Result<CommandOutcome> {
        let Some(id) = request.id.as_deref() else {
            return next.run(request).await;
        };
        let key: Arc<str> = format!("{}\u{0}{id}", request.name).into();
        let fingerprint = fingerprint(&request.payload);
        if let Some(outcome) = self.remembered(&key, &request, fingerprint).await? {
            return Ok(outcome);
        }
        let _turn = self.turn(&key).await;
        // The one before us may have finished while we waited.
        if let Some(outcome) = self.remembered(&key, &request, fingerprint).await? {
            return Ok(outcome);
        }
        let outcome = next.run(request).await?;
        self.completed
            .insert(
                key,
                Arc::new(Remembered {
                    fingerprint,
                    outcome: outcome.clone(),
                }),
            )
            .await;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_forgotten_when_nobody_waits() {
        let middleware = IdempotencyMiddleware::default();
        let key: Arc<str> = "k".into();
        let first = middleware.turn(&key).await;
        let waiting = {
            let lock = middleware
                .in_flight
                .lock()
                .unwrap()
                .get(&key)
                .cloned()
                .unwrap();
            lock.try_lock().is_err()
        };
        assert!(waiting, "the key is held");
        drop(first);
        assert!(middleware.in_flight.lock().unwrap().is_empty());
    }
}
