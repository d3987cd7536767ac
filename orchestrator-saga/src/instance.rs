//! Saga instances in memory and the handles users hold.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::error::{Error, Result};
use crate::id::SagaId;
use crate::log::Live;
use crate::status::{SagaOutcome, SagaSnapshot, SagaStatus};

/// How a runner ended: the outcome, or why it stopped early.
pub(crate) type Finished = std::result::Result<SagaOutcome, Arc<Error>>;

/// One saga instance: its state (the fold of its log) and how its run ended.
pub(crate) struct Instance {
    pub(crate) id: SagaId,
    pub(crate) saga: Arc<str>,
    live: Mutex<Live>,
    done: watch::Sender<Option<Finished>>,
    task: Mutex<Option<AbortHandle>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is only changed by `Live::apply` and by pushing and removing names, none of
    // which can panic half way through, so a poisoned lock still holds a consistent state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Instance {
    pub(crate) fn new(id: SagaId, saga: Arc<str>, live: Live) -> Arc<Self> {
        Arc::new(Self {
            id,
            saga,
            live: Mutex::new(live),
            done: watch::Sender::new(None),
            task: Mutex::new(None),
        })
    }

    /// Runs `f` on the state. `f` must not call back into the instance.
    pub(crate) fn with_live<R>(&self, f: impl FnOnce(&mut Live) -> R) -> R {
        f(&mut lock(&self.live))
    }

    pub(crate) fn status(&self) -> SagaStatus {
        self.with_live(|l| l.status)
    }

    /// Publishes how the run ended; the first call wins.
    pub(crate) fn finish(&self, result: Finished) {
        self.done.send_if_modified(|done| {
            if done.is_some() {
                return false;
            }
            *done = Some(result);
            true
        });
        lock(&self.task).take();
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.borrow().is_some()
    }

    pub(crate) fn set_task(&self, task: AbortHandle) {
        *lock(&self.task) = Some(task);
    }

    /// Stops the runner, as a crash would, and reports it stopped because of `reason`.
    pub(crate) fn stop(&self, reason: Error) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        self.finish(Err(Arc::new(reason)));
    }

    async fn wait(&self) -> Finished {
        let mut receiver = self.done.subscribe();
        let result = receiver.wait_for(Option::is_some).await;
        match result.as_deref() {
            Ok(Some(finished)) => finished.clone(),
            // The sender lives in `self`, so it cannot be gone while we borrow `self`.
            _ => Err(Arc::new(Error::Shutdown)),
        }
    }
}

/// A started (or recovered) saga: its id, its state while it runs, and its outcome.
///
/// Clones refer to the same saga. Dropping every handle does not stop the saga.
#[derive(Clone)]
pub struct SagaHandle {
    pub(crate) instance: Arc<Instance>,
}

impl SagaHandle {
    /// The saga instance's id.
    pub fn id(&self) -> SagaId {
        self.instance.id
    }

    /// The saga's name.
    pub fn saga(&self) -> &str {
        &self.instance.saga
    }

    /// Where the saga stands now.
    pub fn status(&self) -> SagaStatus {
        self.instance.status()
    }

    /// The saga's state now: status, context, completed and running steps, waits.
    pub fn snapshot(&self) -> SagaSnapshot {
        let id = self.instance.id;
        self.instance.with_live(|l| l.snapshot(id))
    }

    /// Waits for the saga to end and returns its outcome — whether it completed, was
    /// compensated or could not be compensated.
    ///
    /// An error means the runner stopped before the end ([`Error::Interrupted`]): the store
    /// failed, another runner took over the saga, or the orchestrator was shut down.
    pub async fn outcome(&self) -> Result<SagaOutcome> {
        self.instance
            .wait()
            .await
            .map_err(|source| Error::Interrupted {
                id: self.instance.id,
                source,
            })
    }

    /// The outcome if the saga has ended, without waiting.
    pub fn try_outcome(&self) -> Option<Result<SagaOutcome>> {
        let done = self.instance.done.borrow();
        done.as_ref().map(|finished| {
            finished.clone().map_err(|source| Error::Interrupted {
                id: self.instance.id,
                source,
            })
        })
    }
}

impl fmt::Debug for SagaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaHandle")
            .field("id", &self.instance.id)
            .field("saga", &self.instance.saga)
            .field("status", &self.status())
            .finish()
    }
}
