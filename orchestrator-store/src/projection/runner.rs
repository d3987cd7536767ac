//! The runner: checkpoint, subscribe, apply with retries, checkpoint again.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use orchestrator_core::{Error, EventEnvelope, EventStore, EventStream, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::replay::is_system_event;

use super::checkpoint::Checkpoints;
use super::{ParkedEvent, Projection, ProjectionOptions, ProjectionState, ProjectionStatus};

/// Feeds a [`Projection`] from a store; see the [module docs](super).
pub struct ProjectionRunner {
    store: Arc<dyn EventStore>,
    name: String,
    projection: Arc<dyn Projection>,
    options: ProjectionOptions,
}

impl std::fmt::Debug for ProjectionRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("store", &self.store.name())
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A running projection: its status, and the way to stop it.
#[derive(Debug)]
pub struct ProjectionHandle {
    status: watch::Receiver<ProjectionStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

enum Applied {
    Yes,
    Parked(Box<ParkedEvent>),
    Stopped,
}

impl ProjectionRunner {
    /// A runner of `projection`, named `name` (which names its checkpoint stream), over
    /// `store`, with the default [`ProjectionOptions`].
    pub fn new(
        store: Arc<dyn EventStore>,
        name: impl Into<String>,
        projection: Arc<dyn Projection>,
    ) -> Self {
        Self {
            store,
            name: name.into(),
            projection,
            options: ProjectionOptions::default(),
        }
    }

    /// Sets the options.
    pub fn with_options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts the runner on the current tokio runtime.
    pub fn spawn(self) -> ProjectionHandle {
        let (status_tx, status) = watch::channel(ProjectionStatus::new(&self.name));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let outcome = self.run(&status_tx, stop_rx).await;
            status_tx.send_modify(|s| {
                s.state = match outcome {
                    Ok(()) => ProjectionState::Stopped,
                    Err(e) => ProjectionState::Failed {
                        error: e.to_string(),
                    },
                };
            });
        });
        ProjectionHandle { status, stop, task }
    }

    /// Rebuilds from scratch: resets the projection, sets the checkpoint back to the start,
    /// and starts the runner, which then applies every event again.
    pub async fn rebuild(self) -> Result<ProjectionHandle> {
        self.projection.reset().await.map_err(Error::Handler)?;
        let (mut checkpoints, _) = Checkpoints::load(&*self.store, &self.name).await?;
        checkpoints.save(&*self.store, &self.name, 0).await?;
        Ok(self.spawn())
    }

    async fn run(
        &self,
        status: &watch::Sender<ProjectionStatus>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let store = &*self.store;
        let (mut checkpoints, checkpoint) = Checkpoints::load(store, &self.name).await?;
        let own = self
            .projection
            .stored_position()
            .await
            .map_err(Error::Handler)?;
        let mut last = own.unwrap_or(checkpoint);
        let head = store.head_position().await?;
        status.send_modify(|s| {
            s.position = last;
            s.checkpoint = checkpoint;
            s.state = ProjectionState::CatchingUp;
        });
        let mut events: EventStream = store
            .subscribe(last + 1, self.options.filter.clone())
            .await?;
        let mut unsaved = 0_u64;
        loop {
            let item = match events.next().now_or_never() {
                Some(item) => item,
                None => {
                    // Caught up: nothing more is ready. Checkpoint, then wait.
                    if unsaved > 0 {
                        checkpoints.save(store, &self.name, last).await?;
                        unsaved = 0;
                        status.send_modify(|s| s.checkpoint = last);
                    }
                    status.send_modify(|s| s.state = ProjectionState::Live);
                    tokio::select! {
                        biased;
                        () = stop_requested(&mut stop) => break,
                        item = events.next() => item,
                    }
                }
            };
            if *stop.borrow() {
                break;
            }
            let Some(item) = item else {
                return Err(Error::Closed {
                    what: format!("the subscription of projection `{}`", self.name),
                });
            };
            let event = item?;
            let Some(position) = event.global_position() else {
                return Err(Error::invalid(
                    "stored event",
                    format!(
                        "event {} came from the store without a position",
                        event.id()
                    ),
                ));
            };
            if position <= last || is_system_event(&event) {
                continue;
            }
            match self.apply(event, status, &mut stop).await {
                Applied::Yes => {}
                Applied::Stopped => break,
                Applied::Parked(parked) => {
                    // Checkpoint first, so that whoever sees the status parked also sees
                    // the checkpoint just before the failing event.
                    if unsaved > 0 {
                        checkpoints.save(store, &self.name, last).await?;
                        status.send_modify(|s| s.checkpoint = last);
                    }
                    tracing::warn!(
                        projection = %self.name,
                        event = %parked.event.id(),
                        position = parked.event.global_position(),
                        attempts = parked.attempts,
                        "projection parked: {}",
                        parked.error
                    );
                    status.send_modify(|s| {
                        s.state = ProjectionState::Parked;
                        s.parked = Some(parked);
                    });
                    stop_requested(&mut stop).await;
                    return Ok(());
                }
            }
            last = position;
            unsaved += 1;
            status.send_modify(|s| {
                s.position = position;
                s.applied += 1;
                s.state = if position >= head {
                    ProjectionState::Live
                } else {
                    ProjectionState::CatchingUp
                };
            });
            if unsaved >= self.options.checkpoint_every {
                checkpoints.save(store, &self.name, last).await?;
                unsaved = 0;
                status.send_modify(|s| s.checkpoint = last);
            }
        }
        if unsaved > 0 {
            checkpoints.save(store, &self.name, last).await?;
            status.send_modify(|s| s.checkpoint = last);
        }
        Ok(())
    }

    /// Applies one event, retrying per the policy; parks on a permanent failure or when the
    /// policy gives up.
    async fn apply(
        &self,
        event: EventEnvelope,
        status: &watch::Sender<ProjectionStatus>,
        stop: &mut watch::Receiver<bool>,
    ) -> Applied {
        let policy = self.options.retry;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.projection.apply(event.clone()).await {
                Ok(()) => return Applied::Yes,
                Err(e) => e,
            };
            let retryable = error.is_retryable();
            let delay = if retryable {
                policy.delay_after(attempts)
            } else {
                None
            };
            let Some(delay) = delay else {
                return Applied::Parked(Box::new(ParkedEvent {
                    event,
                    error: error.message().to_owned(),
                    retryable,
                    attempts,
                }));
            };
            status.send_modify(|s| {
                s.state = ProjectionState::Retrying {
                    attempt: attempts,
                    error: error.message().to_owned(),
                };
            });
            tokio::select! {
                biased;
                () = stop_requested(stop) => return Applied::Stopped,
                () = self.options.clock.sleep(delay) => {}
            }
        }
    }
}

/// Resolves once a stop is requested; never if the handle was dropped without one (the
/// runner then runs on, detached).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl ProjectionHandle {
    /// The current status.
    pub fn status(&self) -> ProjectionStatus {
        self.status.borrow().clone()
    }

    /// Waits until the status satisfies `condition`, and returns it.
    pub async fn wait_for(
        &self,
        mut condition: impl FnMut(&ProjectionStatus) -> bool,
    ) -> ProjectionStatus {
        let mut status = self.status.clone();
        match status.wait_for(|s| condition(s)).await {
            Ok(s) => s.clone(),
            // The runner is gone: its last status is final.
            Err(_) => self.status(),
        }
    }

    /// Waits until the projection has applied the event at `position` (one its filter
    /// passes) and everything before it; an error if it parks, fails or stops first.
    pub async fn wait_for_position(&self, position: u64) -> Result<ProjectionStatus> {
        let status = self
            .wait_for(|s| s.position >= position || s.is_finished())
            .await;
        if status.position >= position {
            return Ok(status);
        }
        Err(Error::invalid(
            "projection",
            format!(
                "`{}` ended at position {} before reaching {position}: {:?}",
                status.name, status.position, status.state
            ),
        ))
    }

    /// Stops the runner (after the event in hand, with a final checkpoint) and returns its
    /// last status.
    pub async fn stop(self) -> ProjectionStatus {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!("projection runner task failed: {e}");
        }
        self.status.borrow().clone()
    }

    /// Aborts the runner at once, as a crash would: no final checkpoint.
    pub fn abort(self) {
        self.task.abort();
    }
}
