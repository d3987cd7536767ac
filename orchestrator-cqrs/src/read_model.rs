//! Read models: documents kept up to date by a projection of the event store, for queries
//! to read.
//!
//! A [`ReadModel`] applies events to a [`ReadModelStore`] (JSON documents by key; in memory
//! by default, [`InMemoryReadModelStore`]). [`QueryBus::attach_read_model`](crate::QueryBus::attach_read_model)
//! runs it with a [`ProjectionRunner`](orchestrator_store::projection::ProjectionRunner) of `orchestrator-store` — catch-up then live, retries,
//! parking, a checkpoint — and, after each event it applies:
//!
//! - tells the query cache, which drops the cached results that depend on the event;
//! - advances the read model's position, which read-your-writes queries wait for.
//!
//! The projection sees every event (so its position passes every command's writes); the
//! definition's filter only decides which ones reach [`ReadModel::apply`]. Where the
//! documents record their position ([`ReadModelStore::position`], as the in-memory store
//! does), the projection resumes from it rather than from the checkpoint — so an in-memory
//! read model is rebuilt from the first event at every start, even over a durable store.
//!
//! # Exactly once
//!
//! Where the store has transactions ([`ReadModelStore::begin`]: the in-memory store, and
//! `PostgresReadModelStore` of `orchestrator-backends`), each event the filter passes is
//! applied in one: [`ReadModel::apply`] gets the transaction's view of the documents, and
//! its writes commit together with the event's position, or not at all — a failed apply
//! (retried, or parked) leaves nothing behind. The transaction first reads the position: if
//! the event is already applied (a second runner of the same read model got there first),
//! it steps aside. So with a durable transactional store, a read model applies each event
//! exactly once, across crashes and restarts: a crash before the commit loses the event's
//! writes and its position together, and the restart resumes with that event. A store
//! without transactions takes the writes as they are made and the position after them (at
//! least once). Events the filter does not pass only move the position.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::{EventEnvelope, EventFilter, HandlerError};
use orchestrator_store::projection::{
    Projection, ProjectionHandle, ProjectionOptions, ProjectionState, ProjectionStatus,
};
use tokio::sync::watch;

use crate::query::cache::Versions;
use crate::telemetry;

#[doc(inline)]
pub use orchestrator_core::read_model::{
    InMemoryReadModelStore, ReadModelStore, ReadModelStoreExt, ReadModelTransaction,
};

/// Applies events to a read model's documents. Any
/// `Fn(EventEnvelope, Arc<dyn ReadModelStore>) -> Future<Output = Result<(), E>>` closure is
/// one.
#[async_trait]
pub trait ReadModel: Send + Sync + 'static {
    /// Applies one stored event. A retryable error is retried per the projection's policy;
    /// a permanent one parks the read model (see `orchestrator_store::projection`).
    ///
    /// Where the read model's store has transactions, `store` is the event's transaction
    /// (see [exactly once](self#exactly-once)): write through it, not through a store kept
    /// aside, or the writes escape the transaction. Return the errors of its calls: a
    /// swallowed error leaves a transaction the store may refuse to commit.
    async fn apply(
        &self,
        event: EventEnvelope,
        store: &Arc<dyn ReadModelStore>,
    ) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut, E> ReadModel for F
where
    F: Fn(EventEnvelope, Arc<dyn ReadModelStore>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError> + 'static,
{
    async fn apply(
        &self,
        event: EventEnvelope,
        store: &Arc<dyn ReadModelStore>,
    ) -> Result<(), HandlerError> {
        self(event, store.clone()).await.map_err(Into::into)
    }
}

/// A read model to attach to a query bus: its name (which names its projection's
/// checkpoint), what it does with events, where it keeps its documents, and which events
/// it wants.
pub struct ReadModelDefinition {
    pub(crate) name: String,
    pub(crate) model: Arc<dyn ReadModel>,
    pub(crate) storage: Arc<dyn ReadModelStore>,
    pub(crate) filter: EventFilter,
    pub(crate) options: ProjectionOptions,
}

impl fmt::Debug for ReadModelDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadModelDefinition")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ReadModelDefinition {
    /// A read model `name` applying events with `model`, kept in a new
    /// [`InMemoryReadModelStore`], seeing every event.
    pub fn new(name: impl Into<String>, model: impl ReadModel) -> Self {
        Self {
            name: name.into(),
            model: Arc::new(model),
            storage: Arc::new(InMemoryReadModelStore::new()),
            filter: EventFilter::all(),
            options: ProjectionOptions::default(),
        }
    }

    /// Keeps the documents in `storage`.
    pub fn storage(mut self, storage: Arc<dyn ReadModelStore>) -> Self {
        self.storage = storage;
        self
    }

    /// Only events passing `filter` reach [`ReadModel::apply`].
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Only events of these types reach [`ReadModel::apply`].
    pub fn event_types<I, T>(mut self, event_types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.filter = event_types
            .into_iter()
            .fold(self.filter, |f, t| f.event_type(t));
        self
    }

    /// Retries, clock and checkpoint frequency of the projection (its filter is replaced:
    /// the projection sees every event, and [`filter`](Self::filter) selects).
    pub fn projection_options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }
}

/// The shared state of an attached read model.
pub(crate) struct Attached {
    pub(crate) name: Arc<str>,
    pub(crate) storage: Arc<dyn ReadModelStore>,
    pub(crate) position: watch::Sender<u64>,
    pub(crate) projection: tokio::sync::RwLock<Option<ProjectionHandle>>,
    /// Set when a stop begins, so waiters let go of the projection for the stop to take it.
    pub(crate) stopping: watch::Sender<bool>,
}

impl Attached {
    /// The runner's status, unless it was stopped or is being stopped.
    pub(crate) fn status(&self) -> Option<ProjectionStatus> {
        self.projection
            .try_read()
            .ok()
            .and_then(|p| p.as_ref().map(ProjectionHandle::status))
    }

    /// Waits until the position reaches `wanted`; `Err` with the runner's state if the
    /// runner ends first (parked, failed or stopped).
    pub(crate) async fn reach(&self, wanted: u64) -> Result<(), String> {
        let mut position = self.position.subscribe();
        let mut stopping = self.stopping.subscribe();
        if *stopping.borrow_and_update() {
            return self.reached_or_stopped(wanted);
        }
        let projection = self.projection.read().await;
        let Some(handle) = projection.as_ref() else {
            return self.reached_or_stopped(wanted);
        };
        tokio::select! {
            biased;
            reached = position.wait_for(|p| *p >= wanted) => match reached {
                Ok(_) => Ok(()),
                Err(_) => Err("stopped".to_owned()),
            },
            _ = stopping.wait_for(|s| *s) => self.reached_or_stopped(wanted),
            status = handle.wait_for(ProjectionStatus::is_finished) => {
                if *self.position.borrow() >= wanted {
                    return Ok(());
                }
                Err(describe(&status))
            }
        }
    }
}

impl Attached {
    fn reached_or_stopped(&self, wanted: u64) -> Result<(), String> {
        if *self.position.borrow() >= wanted {
            Ok(())
        } else {
            Err("stopped".to_owned())
        }
    }
}

pub(crate) fn describe(status: &ProjectionStatus) -> String {
    match (&status.state, &status.parked) {
        (ProjectionState::Parked, Some(parked)) => format!(
            "parked at position {:?}: {}",
            parked.event.global_position(),
            parked.error
        ),
        (state, _) => format!("{state:?}"),
    }
}

/// An attached read model: its documents, its position, its projection's status.
/// Cheap to clone.
#[derive(Clone)]
pub struct ReadModelHandle {
    pub(crate) attached: Arc<Attached>,
}

impl fmt::Debug for ReadModelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadModelHandle")
            .field("name", &self.attached.name)
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl ReadModelHandle {
    /// The read model's name.
    pub fn name(&self) -> &str {
        &self.attached.name
    }

    /// Its documents, for query handlers to read.
    pub fn storage(&self) -> &Arc<dyn ReadModelStore> {
        &self.attached.storage
    }

    /// The global position of the last event it has seen (applied or filtered out).
    pub fn position(&self) -> u64 {
        *self.attached.position.borrow()
    }

    /// Its projection's status; `None` once stopped.
    pub fn status(&self) -> Option<ProjectionStatus> {
        self.attached.status()
    }

    /// Waits until it has seen the event at `position` and everything before it; an error
    /// naming its state if its projection ends first. (Queries wait with a timeout through
    /// [`QueryRequest::at_least`](crate::QueryRequest::at_least).)
    pub async fn wait_for_position(&self, position: u64) -> crate::Result<()> {
        self.attached
            .reach(position)
            .await
            .map_err(|state| crate::Error::NotCaughtUp {
                read_model: self.attached.name.to_string(),
                reached: self.position(),
                wanted: position,
                waited: std::time::Duration::ZERO,
                state: Some(state),
            })
    }

    /// Stops its projection (after the event in hand, with a final checkpoint) and returns
    /// the last status; `None` if it was already stopped. Queries keep reading its documents.
    pub async fn stop(&self) -> Option<ProjectionStatus> {
        self.attached.stopping.send_replace(true);
        let handle = self.attached.projection.write().await.take()?;
        Some(handle.stop().await)
    }
}

/// The projection the runner feeds: applies matching events, then invalidates the cache and
/// advances the position.
pub(crate) struct Feed {
    pub(crate) attached: Arc<Attached>,
    pub(crate) model: Arc<dyn ReadModel>,
    pub(crate) filter: EventFilter,
    pub(crate) versions: Arc<Versions>,
}

impl Feed {
    /// Applies a matching event at `position` in a transaction of the documents, committed
    /// with the position; `false` if the documents already had it.
    async fn apply_in(
        &self,
        tx: Arc<dyn ReadModelTransaction>,
        event: &EventEnvelope,
        position: u64,
    ) -> Result<bool, HandlerError> {
        if tx.position().await?.is_some_and(|done| done >= position) {
            tx.rollback().await?;
            return Ok(false);
        }
        let documents: Arc<dyn ReadModelStore> = tx.clone();
        if let Err(e) = self.model.apply(event.clone(), &documents).await {
            // Dropping the transaction rolls it back too; this returns its connection at once.
            if let Err(rollback) = tx.rollback().await {
                tracing::warn!(read_model = %self.attached.name, "rollback failed: {rollback}");
            }
            return Err(e);
        }
        tx.set_position(position).await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait]
impl Projection for Feed {
    async fn apply(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let position = event.global_position();
        // Whether the position is recorded already (committed with the writes).
        let mut recorded = false;
        if self.filter.matches(&event) {
            let tx = match position {
                Some(_) => self.attached.storage.begin().await?,
                None => None,
            };
            let applied = match (tx, position) {
                (Some(tx), Some(position)) => {
                    recorded = true;
                    self.apply_in(tx, &event, position).await?
                }
                _ => {
                    self.model
                        .apply(event.clone(), &self.attached.storage)
                        .await?;
                    true
                }
            };
            if applied {
                // After the documents changed: a query that read them before this point
                // cached a result under the old versions, which no longer match.
                self.versions.event_applied(&self.attached.name, &event);
            }
        }
        if let Some(position) = position {
            if !recorded {
                self.attached.storage.set_position(position).await?;
            }
            self.attached.position.send_if_modified(|p| {
                let newer = position > *p;
                *p = (*p).max(position);
                newer
            });
            #[allow(clippy::cast_precision_loss)] // a gauge: precision past 2^53 is moot
            metrics::gauge!(telemetry::READ_MODEL_POSITION, "read_model" => self.attached.name.clone())
                .set(position as f64);
        }
        Ok(())
    }

    async fn reset(&self) -> Result<(), HandlerError> {
        self.attached.storage.clear().await?;
        self.attached.position.send_replace(0);
        Ok(())
    }

    async fn stored_position(&self) -> Result<Option<u64>, HandlerError> {
        let stored = self.attached.storage.position().await?;
        if let Some(p) = stored {
            self.attached
                .position
                .send_modify(|mine| *mine = (*mine).max(p));
        }
        Ok(stored)
    }
}
