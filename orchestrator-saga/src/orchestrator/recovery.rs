//! Recovery: finding the sagas logged in the store and resuming the unfinished ones.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use orchestrator_core::{EventEnvelope, EventFilter, ReadAll};

use super::SagaOrchestrator;
use crate::definition::{NodeKind, SagaDefinition};
use crate::error::{Error, Result};
use crate::id::{STREAM_PREFIX, SagaId};
use crate::instance::{Instance, SagaHandle};
use crate::log::{FINISHED, Live, LogWriter, Record, STARTED, read_log};
use crate::status::SagaStatus;

/// How many saga-log events one page of the store scan reads.
const SCAN_PAGE: usize = 1024;

/// What [`SagaOrchestrator::recover`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Recovery {
    /// The unfinished sagas now running again, oldest first.
    pub resumed: Vec<SagaHandle>,
    /// The unfinished sagas that could not be resumed, and why (an undefined saga, a log
    /// that does not fit the definition).
    pub failed: Vec<(SagaId, Error)>,
    /// The unfinished sagas another live process runs (it holds their lease): left to it.
    pub elsewhere: Vec<SagaId>,
}

/// The background task of [`SagaOrchestrator::watch_orphans`]; dropping it stops it.
#[derive(Debug)]
pub struct OrphanWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OrphanWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A saga found in the store by [`SagaOrchestrator::list_stored`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredSaga {
    /// The instance's id.
    pub id: SagaId,
    /// The saga's name.
    pub saga: String,
    /// How it ended; `None` while it is unfinished (running, compensating, or stopped by a
    /// crash and waiting for [`SagaOrchestrator::recover`]).
    pub finished: Option<SagaStatus>,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

impl SagaOrchestrator {
    /// Resumes every unfinished saga found in the store (after a crash or a restart):
    /// forward if it was running, on with compensation if it was compensating. Steps whose
    /// completion was recorded are not run again; a step that was running when the process
    /// stopped runs again with the same attempt number (and idempotency key).
    ///
    /// Sagas this orchestrator is already running are left alone. Their definitions must be
    /// defined first.
    pub async fn recover(&self) -> Result<Recovery> {
        self.check_open()?;
        let mut recovery = Recovery::default();
        let unfinished = self
            .list_stored()
            .await?
            .into_iter()
            .filter(|s| s.finished.is_none());
        for id in unfinished.map(|s| s.id) {
            let running = self
                .shared
                .registry()
                .instances
                .get(&id)
                .is_some_and(|i| !i.is_done());
            if running {
                continue;
            }
            match self.resume(id).await {
                Ok(handle) => recovery.resumed.push(handle),
                Err(Error::RunningElsewhere { .. }) => recovery.elsewhere.push(id),
                Err(e) => {
                    tracing::error!(saga_id = %id, error = %e, "cannot resume saga");
                    recovery.failed.push((id, e));
                }
            }
        }
        Ok(recovery)
    }

    /// Calls [`recover`](Self::recover) now and every `interval`, so that this process takes
    /// over the sagas of a process that died: on a store shared by processes (Redis), each
    /// running saga is held under a lease its runner renews; once the runner's process is
    /// gone and the lease expired (5 s on Redis), the next round here resumes the saga from
    /// its log. While its runner lives, a saga is left to it ([`Recovery::elsewhere`]), so
    /// two live processes never run one saga. Define the sagas first. Stops when the handle
    /// is dropped or the orchestrator shuts down.
    pub fn watch_orphans(&self, interval: std::time::Duration) -> OrphanWatch {
        let orchestrator = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match orchestrator.recover().await {
                    Ok(recovery) => {
                        for handle in &recovery.resumed {
                            tracing::info!(saga_id = %handle.id(), "took over an orphaned saga");
                        }
                        for (id, error) in &recovery.failed {
                            tracing::warn!(saga_id = %id, %error, "an orphaned saga could not be resumed");
                        }
                    }
                    Err(Error::Shutdown) => return,
                    Err(error) => tracing::warn!(%error, "looking for orphaned sagas failed"),
                }
                tokio::time::sleep(interval).await;
            }
        });
        OrphanWatch { task }
    }

    /// Every saga logged in the store, oldest first, read from their `saga.started` and
    /// `saga.finished` records — whoever ran them. For a saga's full state, [`load`](Self::load) it.
    pub async fn list_stored(&self) -> Result<Vec<StoredSaga>> {
        let filter = EventFilter::all()
            .event_type(STARTED)
            .event_type(FINISHED)
            .stream_prefix(STREAM_PREFIX);
        let mut sagas = Vec::new();
        let mut index = HashMap::new();
        let mut from = 1;
        loop {
            let page = self
                .shared
                .store
                .read_all(ReadAll::from(from, SCAN_PAGE).filter(filter.clone()))
                .await?;
            for event in &page {
                let Some(id) = event.stream_id().and_then(SagaId::from_stream) else {
                    continue;
                };
                let corrupt = |e: orchestrator_core::Error| Error::CorruptLog {
                    id,
                    reason: format!("record of type `{}`: {e}", event.event_type()),
                };
                match event.data::<Record>().map_err(corrupt)? {
                    Record::Started { saga, .. } => {
                        index.insert(id, sagas.len());
                        sagas.push(StoredSaga {
                            id,
                            saga,
                            finished: None,
                            started_at: event.time(),
                        });
                    }
                    Record::Finished { status } => {
                        if let Some(&i) = index.get(&id) {
                            sagas[i].finished = Some(status);
                        }
                    }
                    _ => {}
                }
            }
            match page.last().and_then(EventEnvelope::global_position) {
                Some(last) if page.len() == SCAN_PAGE => from = last + 1,
                _ => break,
            }
        }
        Ok(sagas)
    }

    /// Resumes one saga from its log (see [`recover`](Self::recover)). A saga this
    /// orchestrator is running already is returned as it is; a finished one comes back
    /// with its outcome.
    pub async fn resume(&self, id: SagaId) -> Result<SagaHandle> {
        self.check_open()?;
        if let Some(instance) = self.shared.registry().instances.get(&id)
            && !instance.is_done()
        {
            return Ok(SagaHandle {
                instance: instance.clone(),
            });
        }
        let (mut version, mut live) = self.read_live(id).await?;
        let definition = self
            .definition(&live.saga)
            .ok_or_else(|| Error::UndefinedSaga {
                saga: live.saga.clone(),
            })?;
        check_log_fits(id, &definition, &live)?;
        // An unfinished saga is run only under its lease: another live process may run it.
        let mut lease = None;
        if !live.status.is_finished() {
            let held = self.take_lease(id).await?;
            // Read again under the lease: the process that held it until now may have
            // logged more since the first read — even finished the saga and let the lease
            // go — and a runner started from the first read would do that again.
            match self.read_live(id).await.and_then(|(version, live)| {
                check_log_fits(id, &definition, &live)?;
                Ok((version, live))
            }) {
                Ok(fresh) => (version, live) = fresh,
                Err(e) => {
                    release(held.as_deref(), id).await;
                    return Err(e);
                }
            }
            if live.status.is_finished() {
                release(held.as_deref(), id).await;
            } else {
                lease = held;
            }
        }
        let finished = live.status.is_finished().then(|| live.outcome(id));
        let instance = Instance::new(id, definition.shared_name().clone(), live);
        {
            // Checked again under the same lock as the insert, so two concurrent resumes of
            // one saga start one runner.
            let mut registry = self.shared.registry();
            if let Some(running) = registry.instances.get(&id)
                && !running.is_done()
            {
                return Ok(SagaHandle {
                    instance: running.clone(),
                });
            }
            registry.instances.insert(id, instance.clone());
        }
        match finished {
            Some(outcome) => {
                instance.finish(Ok(outcome));
                self.shared.finished(id);
            }
            None => {
                tracing::info!(saga_id = %id, saga = definition.name(), "resuming saga");
                let log = LogWriter::new(id, version, self.shared.exact);
                self.spawn(definition, instance.clone(), log, lease);
            }
        }
        Ok(SagaHandle { instance })
    }

    /// Saga `id`'s log as it stands: its version and the state it replays to.
    async fn read_live(&self, id: SagaId) -> Result<(u64, Live)> {
        let events = read_log(&*self.shared.store, id).await?;
        let version = events
            .last()
            .and_then(EventEnvelope::stream_version)
            .ok_or(Error::NotFound { id })?;
        Ok((version, Live::replay(id, &events)?))
    }
}

/// Gives up a saga's lease this process took but will not run the saga under.
async fn release(lease: Option<&dyn orchestrator_core::Lease>, id: SagaId) {
    if let Some(lease) = lease
        && let Err(e) = lease.release().await
    {
        tracing::debug!(saga_id = %id, error = %e, "releasing a saga's lease failed; it expires");
    }
}

/// Checks that every node the log names exists in the definition (it may have changed
/// since the saga started).
fn check_log_fits(id: SagaId, definition: &SagaDefinition, live: &Live) -> Result<()> {
    let named = live
        .completed
        .iter()
        .chain(live.step_attempts.keys())
        .chain(live.compensated.iter())
        .chain(live.compensation_attempts.keys())
        .chain(live.waits.keys());
    for name in named {
        if !definition.names.contains_key(name.as_str()) {
            return Err(Error::CorruptLog {
                id,
                reason: format!(
                    "the log names `{name}`, which saga `{}` no longer defines",
                    definition.name()
                ),
            });
        }
    }
    for (branch, arm) in &live.branches {
        let fits = match definition.names.get(branch.as_str()) {
            Some(NodeKind::Branch { arms }) => arm.is_none_or(|a| a < *arms),
            _ => false,
        };
        if !fits {
            return Err(Error::CorruptLog {
                id,
                reason: format!(
                    "branch `{branch}` chose an arm that saga `{}` no longer defines",
                    definition.name()
                ),
            });
        }
    }
    Ok(())
}
